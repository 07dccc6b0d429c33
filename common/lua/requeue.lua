-- The reaper's transition for tasks whose lease expired (candidates from expired.lua): each is
-- re-checked here, so an expired lease is requeued exactly once however many reapers run.
-- With attempts left the task becomes pending (the reaper publishes the next attempt at once;
-- the outbox entry covers a reaper that dies before that); otherwise it fails with a
-- dead-letter record.
-- KEYS  globals, then per candidate: task hash
-- ARGV  [1] candidates  [2] retention ms  [3] redeliver ms, then per candidate: id
-- Returns per candidate {id, 'requeued', attempt to publish, record json}, {id, 'failed'}
-- or {id, 'skipped'}.
local n, retention, redeliver = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local out = {}
for i = 0, n - 1 do
  local key, id = KEYS[GLOBALS + 1 + i], ARGV[4 + i]
  local deadline = tonumber(redis.call('ZSCORE', LEASES, id))
  local f = redis.call('HMGET', key, 'state', 'attempt', 'released', 'max_attempts', 'record', 'worker')
  if not deadline or deadline > now then
    out[#out + 1] = { id, 'skipped' }
  elseif f[1] ~= 'running' then
    redis.call('ZREM', LEASES, id) -- a lease without a running task: drop it
    out[#out + 1] = { id, 'skipped' }
  else
    redis.call('ZREM', LEASES, id)
    local attempt = tonumber(f[2])
    if attempt - tonumber(f[3]) >= tonumber(f[4]) then
      fail(key, id, 'running', now, retention,
        'lease expired on attempt ' .. attempt .. ' (worker ' .. (f[6] or '?') .. '); no attempts left')
      out[#out + 1] = { id, 'failed' }
    else
      redis.call('HSET', key, 'state', 'pending', 'updated_ms', now,
        'last_error', 'lease expired on attempt ' .. attempt .. ' (worker ' .. (f[6] or '?') .. ')')
      redis.call('HDEL', key, 'worker')
      move(id, 'running', 'pending', now)
      redis.call('ZADD', DUE, now + redeliver, id)
      out[#out + 1] = { id, 'requeued', attempt + 1, f[5] }
    end
  end
end
return out
