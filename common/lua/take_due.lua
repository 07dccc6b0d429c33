-- Takes members of sorted sets that are due (score ≤ Redis time), up to a limit from each set,
-- so that a backlog in one never starves the other, and pushes their score hold_ms into the
-- future, so that several relays never take the same member at once and a relay that dies
-- mid-way leaves them to be taken again later.
-- KEYS  sorted sets
-- ARGV  [1] at most this many from each set  [2] hold ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, hold = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for _, set in ipairs(KEYS) do
  local members = redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, limit)
  for _, member in ipairs(members) do
    redis.call('ZADD', set, now + hold, member)
    out[#out + 1] = member
  end
end
return out
