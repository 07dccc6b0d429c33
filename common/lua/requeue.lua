-- The reaper's transition for tasks whose lease expired (candidates from expired.lua): each is
-- re-checked here, so an expired lease is requeued exactly once however many reapers run.
-- A lease expires because its worker died, hung or lost Redis, or because the attempt reached
-- its hard deadline (timeout + grace) while its handler still ran. With attempts left the task
-- becomes pending (the reaper publishes the next attempt at once; the outbox entry covers a
-- reaper that dies before that); otherwise it fails with a dead-letter record. A task whose
-- cancellation was requested ends `cancelled`.
-- KEYS  globals, then per candidate: task hash
-- ARGV  [1] candidates  [2] retention ms  [3] redeliver ms, then per candidate: id
-- Returns per candidate {id, 'requeued', attempt to publish, record json, traceparent},
-- {id, 'failed'},
-- {id, 'cancelled'} or {id, 'skipped'}.
local n, retention, redeliver = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local out = {}
for i = 0, n - 1 do
  local key, id = KEYS[GLOBALS + 1 + i], ARGV[4 + i]
  local lease_end = tonumber(redis.call('ZSCORE', LEASES, id))
  local f = redis.call('HMGET', key, 'state', 'attempt', 'released', 'max_attempts', 'record',
    'worker', 'deadline_ms', 'cancel_requested_ms', 'trace')
  if not lease_end or lease_end > now then
    out[#out + 1] = { id, 'skipped' }
  elseif f[1] ~= 'running' then
    redis.call('ZREM', LEASES, id) -- a lease without a running task: drop it
    out[#out + 1] = { id, 'skipped' }
  else
    redis.call('ZREM', LEASES, id)
    -- The attempt ends here, and with it what it held on its worker: a placed task is placed
    -- again (by its next worker's claim, or the dispatcher if it fits there no longer).
    unreserve(key, id)
    local attempt = tonumber(f[2])
    local why, outcome = 'lease expired on attempt ' .. attempt .. ' (worker ' .. (f[6] or '?') .. ')', 'lease_expired'
    if f[7] and tonumber(f[7]) <= now then
      why = 'timeout: attempt ' .. attempt .. ' still running at its hard deadline (worker ' .. (f[6] or '?') .. '); stopped by the reaper'
      outcome = 'deadline'
    end
    attempt_ended(key, now, outcome, why)
    -- The worker no longer owns the attempt: whatever it reports later is fenced.
    redis.call('HDEL', key, 'worker', 'deadline_ms')
    if f[8] then
      finish(key, id, 'running', 'cancelled', now, retention)
      out[#out + 1] = { id, 'cancelled' }
    elseif attempt - tonumber(f[3]) >= tonumber(f[4]) then
      fail(key, id, 'running', now, retention, why .. '; no attempts left')
      out[#out + 1] = { id, 'failed' }
    else
      redis.call('HSET', key, 'state', 'pending', 'updated_ms', now, 'last_error', why)
      move(id, 'running', 'pending', now)
      redis.call('ZADD', OUTBOX, now + redeliver, outbox_member(id, attempt + 1))
      out[#out + 1] = { id, 'requeued', attempt + 1, f[5], f[9] or '' }
    end
  end
end
return out
