-- A worker's heartbeat: extends the leases of all its running tasks in one call (never past a
-- task's hard deadline), records the worker as alive, and reports the tasks it no longer owns
-- and those whose cancellation was requested, so it can stop their handlers.
-- KEYS  globals, then this worker's hash, then per task: task hash
-- ARGV  [1] tasks  [2] worker id  [3] lease ms  [4] worker info (json)  [5] capacity for placed
--       tasks (placement.rs Amounts text), then per task: id, attempt, progress percent ('' when
--       none reported since the last beat), progress message
-- Returns {lost, cancelled}: the 1-based positions of the tasks whose lease is lost, and of
-- those to cancel.
local n, worker, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local lost, cancel = {}, {}
for i = 0, n - 1 do
  local a = 6 + i * 4
  local key, id, attempt = KEYS[GLOBALS + 2 + i], ARGV[a], tonumber(ARGV[a + 1])
  local f = redis.call('HMGET', key, 'state', 'attempt', 'worker', 'deadline_ms', 'cancel_requested_ms')
  if f[1] == 'running' and tonumber(f[2]) == attempt and f[3] == worker then
    local expires = now + lease
    if f[4] then expires = math.min(expires, tonumber(f[4])) end
    redis.call('ZADD', LEASES, 'XX', expires, id)
    if ARGV[a + 2] ~= '' then
      redis.call('HSET', key, 'progress', ARGV[a + 2], 'progress_message', ARGV[a + 3], 'progress_ms', now)
    end
    if f[5] then cancel[#cancel + 1] = i + 1 end
  else
    lost[#lost + 1] = i + 1
  end
end
redis.call('ZADD', WORKERS, now, worker)
if ARGV[5] ~= '' then redis.call('HSET', CAPACITY, worker, ARGV[5]) end
redis.call('HSET', KEYS[GLOBALS + 1], 'info', ARGV[4], 'running', n, 'last_seen_ms', now)
redis.call('PEXPIRE', KEYS[GLOBALS + 1], lease * 3)
return { lost, cancel }
