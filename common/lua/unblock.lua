-- Sends tasks waiting in flow limits' wait lists (see place.lua) back to the inbox, as many as
-- each limit lets start now: for a concurrency limit its free slots (a slot that comes free
-- wakes one task at once, see prelude.lua's wake; this catches a limit raised or removed at
-- run time), for a rate limit its whole tokens not promised to placed tasks (the place script
-- promises them),
-- for a limit no longer in force all of them. At most `cap` per list and call.
-- KEYS  globals
-- ARGV  [1] lists  [2] cap, then per list: dimension, mode ('c' concurrency, 'r' rate, 'a'
--       all), max running (for 'c'), limit, period ms, burst (for 'r'; '' otherwise)
-- Returns per list {moved, ms until its next token (rate lists with tasks left), or -1}.
local n, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local out = {}
for i = 0, n - 1 do
  local a = 3 + i * 5
  local dim, mode = ARGV[a], ARGV[a + 1]
  local list = wait_list(dim)
  local free, next_ms = cap, -1
  if mode == 'c' then
    free = math.max(0, tonumber(ARGV[a + 2]) - running_of(dim))
  elseif mode == 'r' then
    local limit, period, burst = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local placed = tonumber(redis.call('HGET', FLOW_TOKENS, dim .. '|placed')) or 0
    local tokens = bucket_tokens(dim, limit, period, burst, now) - placed
    free = math.floor(tokens)
    if free < 1 then next_ms = math.ceil((1 - tokens) * period / limit) end
  end
  local moved = 0
  if free > 0 then
    local popped = redis.call('ZPOPMIN', list, math.min(free, cap))
    for j = 1, #popped, 2 do
      redis.call('ZADD', INBOX, 'NX', popped[j + 1], popped[j])
      moved = moved + 1
    end
  end
  if redis.call('ZCARD', list) == 0 then
    redis.call('SREM', FLOW_WAITS, dim)
    next_ms = -1
  end
  out[i + 1] = { moved, next_ms }
end
return out
