-- Takes back what placed tasks hold on a worker that is gone (no heartbeat since `live since`,
-- or it drained): one not yet started there waits to be placed again (the message on the gone
-- worker's partition is refused at claim or claimed where it fits), and once the worker holds
-- nothing its use and capacity are forgotten. One still running there keeps its reservation
-- until its lease expires: the reaper's requeue releases it.
-- KEYS  globals, then per reservation: task hash
-- ARGV  [1] reservations  [2] worker  [3] live since, then per reservation: task id
-- Returns how many tasks went back to wait, or -1 when the worker is live after all.
local n, worker, live_since = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local seen = redis.call('ZSCORE', WORKERS, worker)
if seen and tonumber(seen) >= live_since then return -1 end
local now = now_ms()
local back = 0
for i = 0, n - 1 do
  local key, id = KEYS[GLOBALS + 1 + i], ARGV[4 + i]
  local f = redis.call('HMGET', key, 'state', 'reserved_on', 'worker', 'attempt')
  if f[2] ~= worker then
    redis.call('ZREM', RESERVED, worker .. '|' .. id)
  elseif f[1] == 'running' and f[3] == worker then
    -- left to its lease
  elseif f[1] == 'pending' then
    redis.call('ZREM', OUTBOX, outbox_member(id, tonumber(f[4]) + 1))
    await_placement(key, id, now, 'placed on worker ' .. worker .. ', which is gone')
    back = back + 1
  else
    unreserve(key, id)
  end
end
-- '|' is followed by '}': the range is every member of this worker.
if redis.call('ZLEXCOUNT', RESERVED, '[' .. worker .. '|', '(' .. worker .. '}') == 0 then
  redis.call('HDEL', USED, worker)
  redis.call('HDEL', CAPACITY, worker)
end
return back
