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
-- 's' (new, scheduled), 'W' (new, waiting for its parents), 'e' and a terminal state (new, and
-- ended at once by a parent that had not succeeded), 'd' followed by the existing task's id,
-- 'q' followed by the quota it is over, or 'x' and why its submission's dependencies are wrong
-- (refused: nothing of it, or of its submission, is stored). A flat array of short strings, not a pair per task: the caller already
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


-- Dependencies (after the placed tasks): their count, the retention ms, then per task of a
-- submission with dependencies, in (submission, parents-first) order, 6 values: its position,
-- its submission, its parents (one id per line), on_parent_failure, its workflow as given ('':
-- none) and its submission's default workflow. Such a submission is accepted whole or refused
-- whole, and its tasks are accepted parents first.
local deps, groups = {}, {}
local dep_at = placed_at + 1 + (placed_count or 0) * 4
local dep_count = tonumber(ARGV[dep_at]) or 0
local retention = tonumber(ARGV[dep_at + 1])
for j = 0, dep_count - 1 do
  local b = dep_at + 2 + j * 6
  local pos, group = tonumber(ARGV[b]), ARGV[b + 1]
  -- No default workflow: a batch record without dependencies, only accepted whole.
  deps[pos] = { group = group, parents = ARGV[b + 2], policy = ARGV[b + 3],
                workflow = ARGV[b + 4], default = ARGV[b + 5], whole_only = ARGV[b + 5] == '' }
  if not groups[group] then groups[group] = {} end
  local members = groups[group]
  members[#members + 1] = pos
end
-- Ids of this batch's tasks that turned out to be stored ones under another id (a known
-- idempotency key): a child naming them waits for the stored task.
local alias = {}
-- With a success with follow-ups: the workflow they join, and the success's answer.
local spawn_workflow, completed


-- Whether a submission with dependencies can be accepted whole: every parent outside it is a
-- stored task, and its placed tasks fit their quotas. Returns the refusal's code ('x', 'q') and
-- reason, or nothing.
local function check_group(members)
  local ids = {}
  for _, pos in ipairs(members) do ids[ARGV[4 + pos * 11]] = true end
  for _, pos in ipairs(members) do
    for parent in string.gmatch(deps[pos].parents, '[^\n]+') do
      if not ids[parent] and not alias[parent] and redis.call('EXISTS', task_key(parent)) == 0 then
        return 'x', 'unknown parent `' .. parent .. '` of task `' .. ARGV[4 + pos * 11]
          .. '`: no such task (never accepted, or expired)'
      end
    end
  end
  if placed_quotas then
    local before = {}
    for dim, k in pairs(waiting) do before[dim] = k end
    for _, pos in ipairs(members) do
      local key = KEYS[GLOBALS + 1 + pos * 3]
      if placed_quotas[pos] and not (created[key] or redis.call('EXISTS', key) == 1) then
        local why = over_quota(placed_quotas[pos])
        if why then
          waiting = before
          return 'q', why
        end
      end
    end
  end
end

-- Records what a new task of a submission with dependencies adds to its hash (`key`, written
-- as `waiting`): its workflow, its parents, and the edges that make their ends release it.
-- Parents already ended count at once (a failed one ends it by its policy). Returns its code.
local function accept_dependent(key, id, dep, run_at, delay)
  -- Each parent once: two ids of a submission may turn out to be one stored task (an
  -- idempotency key), and a child waits for it once.
  local parents, seen = {}, {}
  for parent in string.gmatch(dep.parents, '[^\n]+') do
    parent = alias[parent] or parent
    if not seen[parent] then
      seen[parent] = true
      parents[#parents + 1] = parent
    end
  end
  local workflow = dep.workflow
  if workflow == '' then
    workflow = spawn_workflow
      or (parents[1] and redis.call('HGET', task_key(parents[1]), 'workflow'))
      or dep.default
  end
  local set = { 'dag', #parents > 0 and 'wp' or 'w', 'workflow', workflow }
  if #parents > 0 then
    set[#set + 1] = 'parents'; set[#set + 1] = table.concat(parents, '\n')
  end
  if dep.policy ~= 'fail' then set[#set + 1] = 'on_parent_failure'; set[#set + 1] = dep.policy end
  if run_at ~= '0' then set[#set + 1] = 'run_at_ms'; set[#set + 1] = run_at end
  if delay ~= '0' then set[#set + 1] = 'delay_ms'; set[#set + 1] = delay end
  redis.call('ZADD', workflow_key(workflow), now, id)
  workflow_opened(workflow)
  zadd_later(IDX.waiting, now, id)
  local open, ended = 0, {}
  for _, parent in ipairs(parents) do
    local pk = task_key(parent)
    local state = redis.call('HGET', pk, 'state')
    if state and not TERMINAL[state] then
      redis.call('SADD', children_key(parent), id)
      mark_dag(pk, 'c')
      open = open + 1
    else
      hold_parent(pk, 1)
      if state ~= 'succeeded' then ended[#ended + 1] = { parent, state or 'failed' } end
    end
  end
  set[#set + 1] = 'deps_left'; set[#set + 1] = text(open + #ended)
  redis.call('HSET', key, unpack(set))
  for _, e in ipairs(ended) do
    local code = parent_ended(key, id, e[1], e[2], now, retention, redeliver)
    if code ~= 'W' then return code end
  end
  if open == 0 then return release(key, id, now, redeliver) end
  return 'W'
end

-- A success with follow-up tasks (a worker's, see store/intake.rs): after the dependencies, '1'
-- and the ending attempt's id, attempt, worker, result JSON and whether its task is placed (its
-- task key is the last key), else '0'. The follow-ups (one submission) are accepted only with
-- the success, here: a crash before this script loses both (the attempt runs again), after it
-- both exist exactly once. Follow-ups that cannot be accepted (an unknown parent) fail the
-- attempt instead, with the reason. They join the workflow of the task that spawned them (which
-- becomes a workflow, named by its id, if it was in none).
local completion_at = dep_at + 2 + dep_count * 6
if ARGV[completion_at] == '1' then
  local c = completion_at + 1
  local ckey, cid = KEYS[#KEYS], ARGV[c]
  local kind, body = 'ok', ARGV[c + 3]
  for _, members in pairs(groups) do
    local code, why = check_group(members)
    if code then
      kind, body = 'fail', 'follow-up tasks refused: ' .. why
      break
    end
  end
  local code = complete_one(ckey, cid, tonumber(ARGV[c + 1]), kind, body, '0', ARGV[c + 2],
    retention, ARGV[c + 4] == '1', now)
  if code ~= 'succeeded' then return { '!' .. code } end
  spawn_workflow = redis.call('HGET', ckey, 'workflow')
  if not spawn_workflow then
    spawn_workflow = cid
    redis.call('HSET', ckey, 'workflow', cid)
    redis.call('ZADD', workflow_key(cid), now, cid)
    -- Kept while a follow-up in it is open (workflow_opened); else it goes with the spawner.
    redis.call('PEXPIRE', workflow_key(cid), text(retention))
  end
  completed = code
end

local function accept_one(i)
  local key, idem_key, queue_key = KEYS[GLOBALS + 1 + i * 3], KEYS[GLOBALS + 2 + i * 3], KEYS[GLOBALS + 3 + i * 3]
  local a = 4 + i * 11
  local id, queue, priority, max_attempts, record = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local has_idem = ARGV[a + 5] == '1'
  -- '0' (now, no delay) is the usual value: tonumber costs a strtod.
  local run_at = 0
  if ARGV[a + 6] ~= '0' then run_at = tonumber(ARGV[a + 6]) end
  if ARGV[a + 7] ~= '0' then run_at = now + tonumber(ARGV[a + 7]) end
  local existing = has_idem and idem_ids[idem_key]
  -- `dep`: its submission's quotas were checked as a whole; `member`: it is in a workflow.
  local dep = deps[i]
  local member = dep and not dep.whole_only and dep
  if existing then
    out[i + 1] = 'd' .. existing
    alias[id] = existing
  elseif placed_quotas and placed_quotas[i] and not dep and not (created[key] or (any_stored and redis.call('EXISTS', key) == 1)) then
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
    if member then state = 'waiting' elseif run_at > now then state = 'scheduled' end
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
    if member then
      out[i + 1] = accept_dependent(key, id, member, ARGV[a + 6], ARGV[a + 7])
    elseif state == 'pending' and needs ~= '' then
      zadd_new_later(INBOX, now, id)
    elseif state == 'pending' then
      zadd_new_later(OUTBOX, now + redeliver, outbox_member(id, '1'))
    else
      redis.call('HSET', key, 'run_at_ms', text(run_at))
      zadd_new_later(DUE, run_at, id)
    end
    if not member then zadd_new_later(IDX[state], now, id) end
    zadd_new_later(queue_key, now, id)
    if not queues[queue] then
      queues[queue] = true
      redis.call('SADD', QUEUES, queue)
    end
    if has_idem then
      redis.call('SET', idem_key, id, 'PX', window)
      idem_ids[idem_key] = id
    end
    if member then -- answered above
    elseif state == 'scheduled' then out[i + 1] = 's'
    elseif needs ~= '' then out[i + 1] = 'w'
    else out[i + 1] = 'p' end
  end
end

for i = 0, n - 1 do
  local dep = deps[i]
  if not dep then
    accept_one(i)
  elseif groups[dep.group] then
    -- A submission with dependencies, at its first task: checked, then accepted whole.
    local members = groups[dep.group]
    groups[dep.group] = nil
    local code, why = check_group(members)
    for _, pos in ipairs(members) do
      if code then out[pos + 1] = code .. why else accept_one(pos) end
    end
  end
end
if completed then
  out[n + 1] = completed
  -- Placed follow-ups wait in the inbox: the dispatchers are woken for them.
  for i = 1, n do
    if out[i] == 'w' then wake_wanted.place = true end
  end
end
return out
