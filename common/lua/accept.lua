-- Records a batch of new submissions: `pending`, with an outbox entry for its first attempt
-- (published by the relay after redeliver_ms unless the scheduler's dispatch is acknowledged
-- first), or `scheduled`, with a timer, when run_at is in the future.
-- A known id or idempotency key returns the existing task instead.
-- KEYS  globals, then per task 3 keys: task hash, idempotency key (the task key when none),
--       queue index
-- ARGV  [1] tasks  [2] redeliver_ms  [3] idempotency window ms, then per task 11 values:
--       id, queue, priority, max_attempts, record json, has idempotency key (0/1), run_at ms (0: now),
--       delay ms (0: none; counted from Redis time here), timeout ms (0: none), kind,
--       traceparent; then the placed tasks: their count, and per placed task its position in the
--       batch (0-based), its needs (what it reserves), its flow dimensions (see flow.rs) and its
--       quotas (`<dim>\t<max waiting>` lines). Streamed tasks have nothing there, so their path
--       reads nothing more.
-- A placed task is counted queued under each flow dimension until it ends (finish); one that
-- would make more than a quota's tasks wait (queued and not holding a reservation) is refused.
-- A placed task due now waits in the placement inbox instead of the outbox: the dispatcher
-- chooses its worker and publishes it.
-- Returns per task one string: 'p' (new, pending), 'w' (new, pending, waiting for placement),
-- 's' (new, scheduled), 'd' followed by the existing task's id, 'q' followed by the quota it
-- is over (refused: nothing of it is stored). A flat array of short strings, not a pair per task: the caller already
-- has each new task's id, and parsing nested replies was a tenth of the scheduler's CPU.
local n, redeliver, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local now_text = text(now)
local out, queues = {}, {}

-- What the batch finds already stored, read with one EXISTS over its task keys and one MGET
-- over its idempotency keys instead of a call per task: each redis.call costs several times
-- the read itself, and a new task (the usual case) exists under neither key. Only when EXISTS
-- counts a stored task does each task check its own key. Tasks created earlier in this batch
-- (an id or idempotency key given twice) are tracked here, since the reads came before them.
local task_keys, idem_keys = {}, {}
for i = 0, n - 1 do
  task_keys[i + 1] = KEYS[GLOBALS + 1 + i * 3]
  -- ARGV[a + 5] of the loop below: whether the task has an idempotency key.
  if ARGV[4 + i * 11 + 5] == '1' then idem_keys[#idem_keys + 1] = KEYS[GLOBALS + 2 + i * 3] end
end
local any_stored = false
chunked('EXISTS', nil, task_keys, function(count) any_stored = any_stored or count > 0 end)
-- The placed tasks' needs, by position (nil: none placed in this batch).
local placed_needs, placed_flow, placed_quotas
local placed_at = 4 + n * 11
local placed_count = tonumber(ARGV[placed_at])
if placed_count and placed_count > 0 then
  placed_needs, placed_flow, placed_quotas = {}, {}, {}
  for j = 0, placed_count - 1 do
    local b = placed_at + 1 + j * 4
    local pos = tonumber(ARGV[b])
    placed_needs[pos], placed_flow[pos] = ARGV[b + 1], ARGV[b + 2]
    if ARGV[b + 3] ~= '' then placed_quotas[pos] = ARGV[b + 3] end
  end
end
local created, idem_ids = {}, {}
chunked('MGET', nil, idem_keys, function(found, first)
  for k = 1, #found do idem_ids[idem_keys[first + k - 1]] = found[k] end
end)

-- Quotas: the tasks waiting under each dimension with one (queued and holding no
-- reservation), read once, then counted on here as this batch adds tasks.
local waiting = {}
local function over_quota(quotas)
  for dim, max in string.gmatch(quotas, '([^\t\n]+)\t(%d+)') do
    if not waiting[dim] then
      local queued = tonumber(redis.call('HGET', FLOW_QUEUED, dim)) or 0
      waiting[dim] = queued - running_of(dim)
    end
    if waiting[dim] + 1 > tonumber(max) then
      return dim .. ' has ' .. waiting[dim] .. ' tasks waiting (max_waiting ' .. max .. ')'
    end
  end
  for dim in string.gmatch(quotas, '([^\t\n]+)\t%d+') do waiting[dim] = waiting[dim] + 1 end
  return nil
end

for i = 0, n - 1 do
  local key, idem_key, queue_key = KEYS[GLOBALS + 1 + i * 3], KEYS[GLOBALS + 2 + i * 3], KEYS[GLOBALS + 3 + i * 3]
  local a = 4 + i * 11
  local id, queue, priority, max_attempts, record = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local has_idem = ARGV[a + 5] == '1'
  -- '0' (now, no delay) is the usual value: tonumber costs a strtod.
  local run_at = 0
  if ARGV[a + 6] ~= '0' then run_at = tonumber(ARGV[a + 6]) end
  if ARGV[a + 7] ~= '0' then run_at = now + tonumber(ARGV[a + 7]) end
  local existing = has_idem and idem_ids[idem_key]
  if existing then
    out[i + 1] = 'd' .. existing
  elseif placed_quotas and placed_quotas[i] and not (created[key] or (any_stored and redis.call('EXISTS', key) == 1)) then
    local why = over_quota(placed_quotas[i])
    if why then
      out[i + 1] = 'q' .. why
    end
  end
  if out[i + 1] then
    -- decided above
  elseif created[key] or (any_stored and redis.call('EXISTS', key) == 1) then
    out[i + 1] = 'd' .. id
  else
    created[key] = true
    local state = 'pending'
    if run_at > now then state = 'scheduled' end
    -- Field order matters: a field is found by scanning the hash from its start, so the ones
    -- that claim and complete read and write go first. Every field written is a scan of the
    -- hash so far, so none is stored that the reader can tell otherwise: not the id (the key
    -- holds it) nor, for a task due now, `run_at_ms` (its `created_ms`); Store::task adds both.
    redis.call('HSET', key, 'state', state, 'attempt', '0', 'timeout_ms', ARGV[a + 8],
      'updated_ms', now_text, 'queue', queue, 'priority', priority, 'released', '0',
      'max_attempts', max_attempts, 'record', record, 'created_ms', now_text,
      'kind', ARGV[a + 9], 'trace', ARGV[a + 10])
    local needs = placed_needs and placed_needs[i] or ''
    if needs ~= '' then
      local flow = placed_flow[i]
      redis.call('HSET', key, 'needs', needs, 'flow', flow)
      for _, dim in ipairs(dims_of(flow)) do incr_later(FLOW_QUEUED, dim, 1) end
    end
    if state == 'pending' and needs ~= '' then
      zadd_new_later(INBOX, now, id)
    elseif state == 'pending' then
      zadd_new_later(OUTBOX, now + redeliver, outbox_member(id, '1'))
    else
      redis.call('HSET', key, 'run_at_ms', text(run_at))
      zadd_new_later(DUE, run_at, id)
    end
    zadd_new_later(IDX[state], now, id)
    zadd_new_later(queue_key, now, id)
    if not queues[queue] then
      queues[queue] = true
      redis.call('SADD', QUEUES, queue)
    end
    if has_idem then
      redis.call('SET', idem_key, id, 'PX', window)
      idem_ids[idem_key] = id
    end
    if state == 'scheduled' then out[i + 1] = 's'
    elseif needs ~= '' then out[i + 1] = 'w'
    else out[i + 1] = 'p' end
  end
end
return out
