-- Claims a batch of deliveries for one worker. A delivery claims its task only when the task is
-- pending and the delivery carries the next attempt; the attempt then becomes the fencing token
-- of every later heartbeat and completion.
-- KEYS  globals, then per delivery: task hash
-- ARGV  [1] deliveries  [2] worker id  [3] lease ms, then per delivery: id, attempt
-- Returns per delivery: 1 claimed, 2 busy (that attempt is running), 3 stale (an older
-- attempt), 4 done (terminal), 5 future (an attempt beyond the next), 6 unknown task,
-- 7 not ready (scheduled, or running an older attempt).
local n, worker, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local out = {}
for i = 0, n - 1 do
  local key, id, attempt = KEYS[GLOBALS + 1 + i], ARGV[4 + i * 2], tonumber(ARGV[5 + i * 2])
  local fields = redis.call('HMGET', key, 'state', 'attempt')
  local state, current = fields[1], tonumber(fields[2])
  local code
  if not state then code = 6
  elseif TERMINAL[state] then code = 4
  elseif attempt <= current then
    if state == 'running' and attempt == current then code = 2 else code = 3 end
  elseif attempt > current + 1 then code = 5
  elseif state ~= 'pending' then code = 7
  else
    redis.call('HSET', key, 'state', 'running', 'attempt', attempt, 'worker', worker,
      'started_ms', now, 'updated_ms', now)
    redis.call('HSETNX', key, 'first_started_ms', now)
    redis.call('ZADD', LEASES, now + lease, id)
    redis.call('ZREM', DUE, id)
    move(id, 'pending', 'running', now)
    code = 1
  end
  out[#out + 1] = code
end
return out
