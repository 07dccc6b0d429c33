-- Cancels tasks. One that has not started (pending, scheduled, or held by a pause) ends
-- `cancelled` here; a message of it still on Kafka is refused at claim as done. A running one
-- is marked: its worker learns at its next heartbeat, signals the handler, aborts it after a
-- grace period, and whatever the handler reports then, the task ends `cancelled` (see
-- complete.lua, requeue.lua, release.lua). Repeating a cancel changes nothing.
-- KEYS  globals, then per task: task hash
-- ARGV  [1] tasks  [2] retention ms, then per task: id
-- Returns per task: 'cancelled', 'cancelling' (running; ends cancelled soon), the terminal
-- state it already had ('succeeded', 'failed', 'cancelled' prefixed with 'ended:'), or
-- 'unknown'.
local n, retention = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local out = {}
for i = 0, n - 1 do
  local key, id = KEYS[GLOBALS + 1 + i], ARGV[3 + i]
  local f = redis.call('HMGET', key, 'state', 'attempt')
  local state = f[1]
  if not state then
    out[#out + 1] = 'unknown'
  elseif TERMINAL[state] then
    out[#out + 1] = 'ended:' .. state
  elseif state == 'running' then
    redis.call('HSETNX', key, 'cancel_requested_ms', now)
    out[#out + 1] = 'cancelling'
  else
    redis.call('HSET', key, 'cancel_requested_ms', now)
    redis.call('ZREM', DUE, id)
    redis.call('ZREM', OUTBOX, outbox_member(id, tonumber(f[2]) + 1))
    redis.call('ZREM', HELD, id)
    redis.call('ZREM', INBOX, id)
    redis.call('ZREM', PARKED, id)
    local dim = redis.call('HGET', key, 'blocked_on')
    if dim and redis.call('ZREM', wait_list(dim), id) == 1
        and redis.call('ZCARD', wait_list(dim)) == 0 then
      redis.call('SREM', FLOW_WAITS, dim)
    end
    unreserve(key, id)
    finish(key, id, state, 'cancelled', now, retention)
    out[#out + 1] = 'cancelled'
  end
end
return out
