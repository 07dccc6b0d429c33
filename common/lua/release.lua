-- Hands running tasks back at once when their worker drains: they become pending again and the
-- relay republishes them immediately. Not a failure: `released` is counted so it does not use
-- up an attempt, while the attempt number itself still only grows (fencing stays intact). Its
-- outbox entry for the next attempt is due now.
-- A task whose cancellation was requested ends `cancelled` instead.
-- The worker also leaves the live-worker set, so the relay routes the released tasks to
-- partitions of workers that stay.
-- KEYS  globals, then this worker's hash, then per task: task hash
-- ARGV  [1] tasks  [2] worker id  [3] retention ms, then per task: id, attempt
-- Returns the number of tasks released.
local n, worker, retention = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local released = 0
for i = 0, n - 1 do
  local key, id, attempt = KEYS[GLOBALS + 2 + i], ARGV[4 + i * 2], tonumber(ARGV[5 + i * 2])
  local f = redis.call('HMGET', key, 'state', 'attempt', 'worker', 'cancel_requested_ms')
  if f[1] == 'running' and tonumber(f[2]) == attempt and f[3] == worker then
    redis.call('ZREM', LEASES, id)
    unreserve(key, id)
    if f[4] then
      attempt_ended(key, now, 'cancelled', 'cancelled while its worker was shutting down')
      finish(key, id, 'running', 'cancelled', now, retention)
    else
      attempt_ended(key, now, 'released', 'handed back: worker shutting down')
      redis.call('HINCRBY', key, 'released', 1)
      redis.call('HSET', key, 'state', 'pending', 'updated_ms', now)
      redis.call('HDEL', key, 'worker', 'deadline_ms')
      move(id, 'running', 'pending', now)
      redis.call('ZADD', OUTBOX, now, outbox_member(id, attempt + 1))
      released = released + 1
    end
  end
end
redis.call('ZREM', WORKERS, worker)
-- Leaving: nothing more is placed here (placed tasks not yet started are placed again once
-- the dispatcher finds the worker gone).
redis.call('HDEL', CAPACITY, worker)
redis.call('DEL', KEYS[GLOBALS + 1])
return released
