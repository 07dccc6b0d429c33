-- A worker's heartbeat: extends the leases of all its running tasks in one call, records the
-- worker as alive, and reports the tasks it no longer owns so it can stop their handlers.
-- KEYS  globals, [12] this worker's hash, then per task: task hash
-- ARGV  [1] tasks  [2] worker id  [3] lease ms  [4] worker info (json), then per task: id, attempt
-- Returns the 1-based positions of the tasks whose lease is lost.
local n, worker, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local lost = {}
for i = 0, n - 1 do
  local key, id, attempt = KEYS[GLOBALS + 2 + i], ARGV[5 + i * 2], tonumber(ARGV[6 + i * 2])
  local fields = redis.call('HMGET', key, 'state', 'attempt', 'worker')
  if fields[1] == 'running' and tonumber(fields[2]) == attempt and fields[3] == worker then
    redis.call('ZADD', LEASES, 'XX', now + lease, id)
  else
    lost[#lost + 1] = i + 1
  end
end
redis.call('ZADD', WORKERS, now, worker)
redis.call('HSET', KEYS[GLOBALS + 1], 'info', ARGV[4], 'running', n, 'last_seen_ms', now)
redis.call('PEXPIRE', KEYS[GLOBALS + 1], lease * 3)
return lost
