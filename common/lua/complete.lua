-- Records the outcomes of a batch of attempts. Only the current attempt of the owning worker
-- may change a running task; anything else is fenced and changes nothing. A task whose
-- cancellation was requested ends `cancelled` whatever its handler reported, so a cancel that
-- was answered `cancelling` always wins the race with the completion.
-- KEYS  globals, then per outcome: task hash
-- ARGV  [1] outcomes  [2] worker id  [3] retention ms  [4] placed: '' when no outcome is of a
--       placed task, else one character per outcome, '1' for a placed task (the ending attempt
--       releases what it reserved on the worker), '0' otherwise; then per outcome 5 values: id,
--       attempt, kind ('ok' | 'retry' | 'fail' | 'cancel'), body (result json or error), retry
--       delay ms
-- Returns per outcome: 'succeeded', 'scheduled' (retry), 'failed', 'cancelled', 'already'
-- (this attempt already ended the task, or already scheduled its retry), or 'fenced'.
local n, worker, retention, placed = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now = now_ms()
local out = {}
-- Whether a failed attempt may be retried: read only on that path, not for every outcome.
local function within_budget(key, current)
  local b = redis.call('HMGET', key, 'released', 'max_attempts')
  return current - tonumber(b[1]) < tonumber(b[2])
end
for i = 0, n - 1 do
  local key = KEYS[GLOBALS + 1 + i]
  local a = 5 + i * 5
  -- `body`: the result JSON or the error (not `text`, which is the prelude's number formatter).
  local id, attempt, kind, body = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
  -- Absent fields cost a scan of the whole hash, so two are avoided: a running attempt has a
  -- deadline exactly when its task has a timeout (claim.lua), and a first attempt has no
  -- history to extend (nor needs its start, which only a history entry records).
  local f
  if attempt > 1 then
    f = redis.call('HMGET', key, 'state', 'attempt', 'worker', 'cancel_requested_ms',
      'queue', 'priority', 'timeout_ms', 'started_ms', 'history', 'dag')
  else
    f = redis.call('HMGET', key, 'state', 'attempt', 'worker', 'cancel_requested_ms',
      'queue', 'priority', 'timeout_ms', 'dag')
  end
  -- Whether it is in a workflow (see prelude.lua's dependencies).
  local dag = f[attempt > 1 and 10 or 8]
  local state, current = f[1], tonumber(f[2])
  if state == 'running' and current == attempt and f[3] == worker then
    zrem_later(LEASES, id)
    -- A placed task's flow dimensions (a streamed one has none: nothing is read for it).
    local flow = false
    if placed ~= '' and string.sub(placed, i + 1, i + 1) == '1' then
      flow = redis.call('HGET', key, 'flow')
      unreserve(key, id)
      if kind == 'ok' and not f[4] then learn_run_time(key, now) end
    end
    if f[4] then
      local note = 'cancelled while running'
      if kind ~= 'ok' and kind ~= 'cancel' then note = note .. '; handler reported: ' .. body end
      attempt_ended(key, now, 'cancelled', note)
      finish(key, id, 'running', 'cancelled', now, retention)
      out[i + 1] = 'cancelled'
    elseif kind == 'ok' then
      -- The hot path: everything read above, one HSET. A task whose only attempt succeeded
      -- gets no `history`: that attempt is its attempt, worker, started_ms and finished_ms
      -- (Store::task shows it as a one-entry history), so nothing is built or stored for it.
      local set = { 'result', body }
      if f[9] and f[9] ~= '' then
        set[3] = 'history'
        set[4] = history_after(f[9], f[2], f[3], f[8], now, 'succeeded', '')
      end
      finish(key, id, 'running', 'succeeded', now, retention,
        f[5], f[6], f[7] ~= '0' and (tonumber(f[7]) or 0) > 0, set, flow, dag)
      out[i + 1] = 'succeeded'
    elseif kind == 'retry' and within_budget(key, current) then
      attempt_ended(key, now, 'retry', body)
      local delay = tonumber(ARGV[a + 4])
      redis.call('HSET', key, 'state', 'scheduled', 'last_error', body, 'updated_ms', now,
        'run_at_ms', now + delay)
      redis.call('HDEL', key, 'deadline_ms')
      move(id, 'running', 'scheduled', now)
      zadd_later(DUE, now + delay, id)
      out[i + 1] = 'scheduled'
    else
      attempt_ended(key, now, 'failed', body)
      fail(key, id, 'running', now, retention, body)
      out[i + 1] = 'failed'
    end
  elseif state and TERMINAL[state] and current == attempt and f[3] == worker then
    out[i + 1] = 'already'
  elseif kind == 'retry' and (state == 'scheduled' or state == 'pending') and current == attempt
      and f[3] == worker then
    -- A retried call whose first try scheduled this very retry (its reply was lost): recorded,
    -- not fenced. Only a handler's retry keeps the ended attempt's `worker`; a lease that
    -- expired, a release and a redrive remove it, so their attempts' late reports are fenced.
    out[i + 1] = 'already'
  else
    out[i + 1] = 'fenced'
  end
end
return out
