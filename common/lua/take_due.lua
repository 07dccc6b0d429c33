-- Takes members of a sorted set that are due (score ≤ Redis time) and pushes their score
-- hold_ms into the future, so that several relays never take the same member at once and a
-- relay that dies mid-way leaves them to be taken again later.
-- KEYS  [1] sorted set
-- ARGV  [1] at most this many  [2] hold ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
end
return ids
