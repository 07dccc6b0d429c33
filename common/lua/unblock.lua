-- Sends tasks waiting in flow limits' wait lists (see place.lua) back to the inbox, as many as
-- each limit lets start now: for a concurrency limit its free slots (a slot that comes free
-- wakes one task at once, see prelude.lua's wake; this catches a limit raised or removed at
-- run time), for a rate limit its whole tokens not promised to placed tasks (the place script
-- promises them),
-- for a limit no longer in force all of them. At most `cap` per list and call.
-- KEYS  globals
-- ARGV  [1] lists  [2] cap, then per list: dimension, mode ('c' concurrency, 'r' rate, 'a'
--       all), max running (for 'c'), limit, period ms, burst (for 'r'; '' otherwise)
-- A rate list's tasks handed back and not yet placed (or blocked again) count against its
-- tokens for a second (`<dim>|back` in FLOW_TOKENS: `<n>,<ms>`, see prelude.lua), so a fleet
-- with no room does not drain the list into its queue a token's worth per round.
-- Returns per list {moved, ms until its next token (rate lists with tasks left, when waiting
-- can bring one: not while the bucket's room is all promised or handed back), or -1}.
local n, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local out = {}
for i = 0, n - 1 do
  local a = 3 + i * 5
  local dim, mode = ARGV[a], ARGV[a + 1]
  local list = wait_list(dim)
  local free, next_ms = cap, -1
  local rate
  if mode == 'c' then
    free = math.max(0, tonumber(ARGV[a + 2]) - running_of(dim))
  elseif mode == 'r' then
    local limit, period, burst = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local placed = tonumber(redis.call('HGET', FLOW_TOKENS, dim .. '|placed')) or 0
    local back = handed_back(dim, now)
    local tokens = bucket_tokens(dim, limit, period, burst, now) - placed - back
    free = math.max(0, math.floor(tokens))
    rate = { limit = limit, period = period, room = burst - placed - back, tokens = tokens }
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
  elseif rate then
    if moved > 0 then hand_back(dim, moved, now) end
    -- The next token beyond those just handed back: only if the bucket can still hold one
    -- (while its room is promised or handed back, starts and placements free it, not time).
    if rate.room - moved >= 1 then
      next_ms = math.max(1, math.ceil((moved + 1 - rate.tokens) * rate.period / rate.limit))
    end
  end
  out[i + 1] = { moved, next_ms }
end
return out
