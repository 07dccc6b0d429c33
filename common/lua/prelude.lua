-- Prepended to every transition script (see store/scripts.rs). KEYS[1..20] are the globals of
-- Keys::globals(): leases, due, dead outbox, five state indexes, queues, workers, paused, held,
-- totals, outbox, placement's inbox, use, capacity, reservations, run times and parked
-- tasks, flow control's queued and running counts, wait lists and token buckets, and
-- dependencies' waiting and skipped indexes and open workflows.
local LEASES, DUE, DEAD = KEYS[1], KEYS[2], KEYS[3]
-- No `running` index: the lease set is the running tasks' index (schema 4), and every script
-- that starts or ends an attempt adds or removes its lease itself.
local IDX = { pending = KEYS[4], scheduled = KEYS[5],
              succeeded = KEYS[6], failed = KEYS[7], cancelled = KEYS[8] }
local QUEUES, WORKERS, PAUSED, HELD, TOTALS = KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local OUTBOX = KEYS[14]
local INBOX, USED, CAPACITY, RESERVED = KEYS[15], KEYS[16], KEYS[17], KEYS[18]
local RUN_TIMES, PARKED = KEYS[19], KEYS[20]
local FLOW_QUEUED, FLOW_RUNNING, FLOW_WAITS, FLOW_TOKENS = KEYS[21], KEYS[22], KEYS[23], KEYS[24]
IDX.waiting, IDX.skipped = KEYS[25], KEYS[26]
local WORKFLOWS = KEYS[27]
local GLOBALS = 27
local TERMINAL = { succeeded = true, failed = true, cancelled = true, skipped = true }
-- `{prefix}`: keys named by data (a task's parents and children, its workflow) are built from
-- it as store/keys.rs builds them, all under the one hash tag.
local ROOT = string.sub(LEASES, 1, #LEASES - #':leases')
local function task_key(id) return ROOT .. ':task:' .. id end
local function children_key(id) return ROOT .. ':children:' .. id end
local function workflow_key(id) return ROOT .. ':workflow:' .. id end
-- Most entries a task's attempt history keeps (the oldest are dropped first).
local HISTORY_MAX = 100

-- Redis server time in ms: leases never depend on a client's clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A number as a Redis argument. Redis formats every number argument of redis.call with
-- snprintf("%.17g"), which showed up in profiles of the hot scripts; a batch has few distinct
-- numbers (its Redis time, lease ends), so each is formatted once here and passed as a string.
local number_text = {}
local function text(n)
  local s = number_text[n]
  if not s then
    s = string.format('%.17g', n)
    number_text[n] = s
  end
  return s
end

-- Sorted-set writes and counters of a batch are collected here and written at the end of the
-- script (scripts.rs appends `flush_later()`), one variadic command per key instead of one call
-- per task: each redis.call costs far more than one more element. Per key and member the last
-- write wins, exactly as if the calls had run in order. Nothing reads these keys back within a
-- script before the flush (state indexes, leases, due, held, queue indexes, totals).
local later_add, later_rem, later_incr = {}, {}, {}
-- Set when the script released a task waiting for its parents: the relays (its first dispatch
-- is in the outbox) or the dispatchers (a placed task, in the inbox) are woken by a PUBLISH at
-- the end, instead of finding it at their next round.
local wake_wanted = {}

local function zadd_later(key, score, id)
  local adds, rems = later_add[key], later_rem[key]
  if not adds then adds = {}; later_add[key] = adds end
  adds[id] = score
  if rems then rems[id] = nil end
end

local function zrem_later(key, id)
  local adds, rems = later_add[key], later_rem[key]
  if not rems then rems = {}; later_rem[key] = rems end
  rems[id] = true
  if adds then adds[id] = nil end
end

-- New members only: appended, not looked up. For members no other deferred write of the same
-- script touches (accept's new tasks), so there is nothing for the last write to win over.
local later_new = {}
local function zadd_new_later(key, score, id)
  local list = later_new[key]
  if not list then list = { n = 0 }; later_new[key] = list end
  local k = list.n
  list[k + 1] = text(score); list[k + 2] = id
  list.n = k + 2
end

local function incr_later(key, field, by)
  local counts = later_incr[key]
  if not counts then counts = {}; later_incr[key] = counts end
  counts[field] = (counts[field] or 0) + (by or 1)
end

-- Sends `cmd args...` (`cmd key args...` when `key` is given) in chunks of 1000 arguments, as
-- Lua's unpack has a stack limit; hands each reply and the index of its chunk's first argument
-- to `on_reply`, when given.
local function chunked(cmd, key, args, on_reply)
  for j = 1, #args, 1000 do
    local last, reply = math.min(j + 999, #args)
    if key then
      reply = redis.call(cmd, key, unpack(args, j, last))
    else
      reply = redis.call(cmd, unpack(args, j, last))
    end
    if on_reply then on_reply(reply, j) end
  end
end

-- Sends `args` as `cmd key args...` in chunks.
local function variadic(cmd, key, args)
  chunked(cmd, key, args)
end

-- Placement (see placement.rs). Amounts are text `name=thousandths;...`, names in order.
local function amounts(s)
  local t = {}
  if s then
    for name, milli in string.gmatch(s, '([^=;]+)=(%d+)') do t[name] = tonumber(milli) end
  end
  return t
end

local function amounts_text(t)
  local names = {}
  for name, milli in pairs(t) do
    if milli > 0 then names[#names + 1] = name end
  end
  table.sort(names)
  for i, name in ipairs(names) do names[i] = name .. '=' .. string.format('%d', t[name]) end
  return table.concat(names, ';')
end

-- Flow control (see flow.rs). A placed task's `flow` field lists its dimensions, one per
-- line (`queue:<q>`, `kind:<k>`, and `key:`, `tenant:`, `rate:` when it names them). It is
-- counted under each in FLOW_QUEUED from acceptance to its end, and in FLOW_RUNNING while it
-- holds a reservation: from placement to the end of the attempt, exactly as its worker's use.
local function dims_of(flow)
  local t = {}
  if flow then
    for dim in string.gmatch(flow, '[^\n]+') do t[#t + 1] = dim end
  end
  return t
end

-- What placed tasks hold on each worker, read once per script and written back once at its end
-- (flush_later), however many of its tasks a script reserves or releases: each worker's use
-- is one field, so per-task writes would rewrite it again and again.
local use_cache, use_dirty, capacity_cache = {}, {}, {}
local function used_of(worker)
  local used = use_cache[worker]
  if not used then
    used = amounts(redis.call('HGET', USED, worker) or nil)
    use_cache[worker] = used
  end
  return used
end

-- Run times kept per kind, for sjf's estimate of tasks that give none (their median); a
-- script's new ones are appended once per kind at its end.
local RUN_TIMES_KEPT = 31
local run_times_later = {}

local function flush_later()
  -- Counted, not `#args + 1`: Lua's length operator is a binary search.
  for key, rems in pairs(later_rem) do
    local args, k = {}, 0
    for id in pairs(rems) do k = k + 1; args[k] = id end
    variadic('ZREM', key, args)
  end
  for key, adds in pairs(later_add) do
    local args, k = {}, 0
    for id, score in pairs(adds) do args[k + 1] = text(score); args[k + 2] = id; k = k + 2 end
    variadic('ZADD', key, args)
  end
  for key, list in pairs(later_new) do
    list.n = nil
    variadic('ZADD', key, list)
  end
  for key, counts in pairs(later_incr) do
    local flow = key == FLOW_QUEUED or key == FLOW_RUNNING
    for field, n in pairs(counts) do
      if n ~= 0 then
        local v = redis.call('HINCRBY', key, field, text(n))
        -- Flow counts are kept per key and tenant: one at zero goes, so the hashes hold only
        -- what is queued or running now.
        if flow and v <= 0 then redis.call('HDEL', key, field) end
      end
    end
  end
  for worker in pairs(use_dirty) do
    local s = amounts_text(use_cache[worker])
    if s == '' then redis.call('HDEL', USED, worker) else redis.call('HSET', USED, worker, s) end
  end
  for what in pairs(wake_wanted) do redis.call('PUBLISH', ROOT .. ':wake', what) end
  for kind, times in pairs(run_times_later) do
    local kept = {}
    local list = redis.call('HGET', RUN_TIMES, kind)
    if list then
      for v in string.gmatch(list, '%d+') do kept[#kept + 1] = v end
    end
    for _, ms in ipairs(times) do kept[#kept + 1] = ms end
    redis.call('HSET', RUN_TIMES, kind,
      table.concat(kept, ',', math.max(1, #kept - RUN_TIMES_KEPT + 1)))
  end
end

-- Whether a script's error is Redis refusing a write for want of memory (maxmemory reached,
-- noeviction). Redis refuses only a script's first write that may grow memory, so after this
-- error the script has written nothing.
local function refused_for_memory(err)
  if type(err) == 'table' then err = err.err end
  return type(err) == 'string' and string.match(err, '^%-?OOM ') ~= nil
end

-- The outbox entry of one attempt of a task (store/keys.rs `outbox_member` writes the same).
-- `attempt` may be a string (an argument) or a number; a number is formatted by `text`, since
-- Lua's own number-to-string conversion calls snprintf every time.
local function outbox_member(id, attempt)
  if type(attempt) == 'number' then attempt = text(attempt) end
  return id .. '#' .. attempt
end

-- Moves `id` from one state index to another; `running` has none but the lease set, which the
-- caller writes.
local function move(id, from, to, now)
  local out_of, into = IDX[from], IDX[to]
  if out_of then zrem_later(out_of, id) end
  if into then zadd_later(into, now, id) end
end

-- The totals' field names (`<state>:queue:<name>`, `<state>:priority:<level>`), each built once
-- per batch: its tasks end in few states, queues and priorities, and building a string costs
-- more than looking one up.
local total_fields = { queue = {}, priority = {} }
local function total_field(dimension, to, name)
  local names = total_fields[dimension][to]
  if not names then
    names = {}
    total_fields[dimension][to] = names
  end
  local field = names[name]
  if not field then
    field = to .. ':' .. dimension .. ':' .. name
    names[name] = field
  end
  return field
end

-- Defined below (dependencies): called by finish for a task in a workflow.
local dag_finished

-- Ends a task in a terminal state: index, timestamps, totals per queue and priority, expiry
-- after the retention period. A caller that already read `queue`, `priority` and whether the
-- attempt has a deadline passes them, and may pass more fields to set (`set`, a list of
-- field-value pairs), saving calls on the hot path; with no queue they are read here. A placed
-- task's flow dimensions (`flow`, its field: read here with the rest, or passed; false for
-- none) count one queued task less. A task with dependencies (`dag`, its field, read or passed
-- the same way) releases or ends its children here too.
local function finish(key, id, from, to, now, retention, queue, priority, has_deadline, set, flow, dag)
  if not queue then
    local f = redis.call('HMGET', key, 'queue', 'priority', 'deadline_ms', 'flow', 'dag')
    queue, priority, has_deadline, flow, dag = f[1], f[2], f[3] ~= false, f[4], f[5]
  end
  if flow then
    for _, dim in ipairs(dims_of(flow)) do incr_later(FLOW_QUEUED, dim, -1) end
  end
  incr_later(TOTALS, total_field('queue', to, queue or '?'))
  incr_later(TOTALS, total_field('priority', to, priority or '?'))
  set = set or {}
  -- No `updated_ms`: it would repeat `finished_ms` (Store::task fills it in).
  local n, at = #set, text(now)
  set[n + 1] = 'state'; set[n + 2] = to
  set[n + 3] = 'finished_ms'; set[n + 4] = at
  redis.call('HSET', key, unpack(set))
  if has_deadline then redis.call('HDEL', key, 'deadline_ms') end
  move(id, from, to, now)
  redis.call('PEXPIRE', key, text(retention))
  if dag then dag_finished(key, id, to, now, retention) end
end

-- Marks a task failed and queues its dead-letter record.
local function fail(key, id, from, now, retention, err)
  redis.call('HSET', key, 'error', err, 'last_error', err)
  finish(key, id, from, 'failed', now, retention)
  redis.call('ZADD', DEAD, now, id)
end

-- Dependencies (see workflow.rs). A task in a workflow has a `dag` field: `w`, then `p` if it
-- names parents (`parents`, one id per line; `deps_left`, how many have not ended) and `c`
-- once some task waits for it (its children set). Its `workflow` field names its workflow.

-- Adds `flag` to a task's `dag` field.
local function mark_dag(key, flag)
  local dag = redis.call('HGET', key, 'dag') or ''
  if not string.find(dag, flag, 1, true) then redis.call('HSET', key, 'dag', dag .. flag) end
end

-- One more task of `workflow` not ended; its set is kept meanwhile.
local function workflow_opened(workflow)
  redis.call('HINCRBY', WORKFLOWS, workflow, 1)
  redis.call('PERSIST', workflow_key(workflow))
end

-- One task of `workflow` ended; with none left open, the set expires with its tasks.
local function workflow_closed(workflow, retention)
  if redis.call('HINCRBY', WORKFLOWS, workflow, -1) <= 0 then
    redis.call('HDEL', WORKFLOWS, workflow)
    redis.call('PEXPIRE', workflow_key(workflow), text(retention))
  end
end

-- A parent that ended is kept (its result, for ctx.parents()) while children of its are not
-- ended: `open_children` counts them; the last to end lets it expire.
local function hold_parent(key, by)
  redis.call('HINCRBY', key, 'open_children', by)
  redis.call('PERSIST', key)
end

local function unhold_parent(key, retention)
  local f = redis.call('HMGET', key, 'open_children', 'state')
  if not f[1] then return end
  if tonumber(f[1]) <= 1 then
    redis.call('HDEL', key, 'open_children')
    -- A parent redriven since it counted its children expires when it ends again.
    if TERMINAL[f[2]] then redis.call('PEXPIRE', key, text(retention)) end
  else
    redis.call('HINCRBY', key, 'open_children', -1)
  end
end

-- Moves a waiting task whose parents have all ended on to run: `pending` (its first dispatch
-- in the outbox, due `redeliver` ms from now, or for a placed task the placement inbox) or
-- `scheduled` (its run_at, or delay counted from now, is ahead). Returns accept's code.
local function release(key, id, now, redeliver)
  local g = redis.call('HMGET', key, 'needs', 'run_at_ms', 'delay_ms', 'attempt')
  local run_at = tonumber(g[2]) or 0
  if g[3] then run_at = now + tonumber(g[3]) end
  redis.call('HDEL', key, 'deps_left', 'delay_ms')
  if run_at > now then
    redis.call('HSET', key, 'state', 'scheduled', 'updated_ms', text(now), 'run_at_ms', text(run_at))
    move(id, 'waiting', 'scheduled', now)
    zadd_later(DUE, run_at, id)
    return 's'
  end
  redis.call('HSET', key, 'state', 'pending', 'updated_ms', text(now))
  move(id, 'waiting', 'pending', now)
  if g[1] then
    redis.call('ZADD', INBOX, 'NX', now, id)
    if not redeliver then wake_wanted.place = true end
    return 'w'
  end
  zadd_later(OUTBOX, now + (redeliver or 0), outbox_member(id, (tonumber(g[4]) or 0) + 1))
  -- At acceptance the scheduler publishes it itself (`redeliver` is given): no wake-up.
  if not redeliver then wake_wanted.relay = true end
  return 'p'
end

-- A waiting task's parent `parent` ended in `state`: it is released if that was its last
-- parent, or ends now by its `on_parent_failure` (fail: `failed`, or `cancelled` after a
-- cancelled parent; skip: `skipped`; a skipped parent skips a `fail` child too; run: it waits
-- on).
-- Returns accept's code for it: 'W' (waits on), 'p'/'w'/'s' (released), 'e' and the state it
-- ended in, or nil if it was not waiting.
local function parent_ended(key, id, parent, state, now, retention, redeliver)
  local g = redis.call('HMGET', key, 'state', 'on_parent_failure')
  if g[1] ~= 'waiting' then return nil end
  local left = redis.call('HINCRBY', key, 'deps_left', -1)
  local policy = g[2] or 'fail'
  if state ~= 'succeeded' and policy ~= 'run' then
    local what = 'failed'
    if state == 'cancelled' then what = 'was cancelled' elseif state == 'skipped' then what = 'was skipped' end
    local why = 'dependency ' .. parent .. ' ' .. what
    if policy == 'fail' and state == 'failed' then
      fail(key, id, 'waiting', now, retention, why)
      return 'efailed'
    end
    local to = 'skipped'
    if policy == 'fail' and state == 'cancelled' then to = 'cancelled' end
    redis.call('HSET', key, 'error', why)
    finish(key, id, 'waiting', to, now, retention)
    return 'e' .. to
  end
  if left <= 0 then return release(key, id, now, redeliver) end
  return 'W'
end

-- Tasks in a workflow that ended, whose children and parents are still to be told: a queue, not
-- recursion, so a chain of any length ends children after children within the one script.
local dag_queue, dag_busy = {}, false

local function dag_ended(key, id, to, now, retention)
  local f = redis.call('HMGET', key, 'dag', 'parents', 'workflow')
  local dag = f[1] or ''
  -- Its parents that ended (and counted it, or were held for it) kept their results for it:
  -- one child less to wait for. A parent holds an `open_children` count only once it ended.
  if f[2] then
    for parent in string.gmatch(f[2], '[^\n]+') do unhold_parent(task_key(parent), retention) end
  end
  -- Children counted at an earlier end (before a redrive) still hold it.
  local held = tonumber(redis.call('HGET', key, 'open_children')) or 0
  if string.find(dag, 'c', 1, true) then
    local ck = children_key(id)
    local children = redis.call('SMEMBERS', ck)
    redis.call('DEL', ck)
    -- Counted before they are told: each child open now releases its hold when it ends,
    -- also one this very end makes fail or skip (its own end is handled after this one).
    local open = 0
    for _, child in ipairs(children) do
      local s = redis.call('HGET', task_key(child), 'state')
      if s and not TERMINAL[s] then open = open + 1 end
    end
    if open > 0 then held = held + open; redis.call('HSET', key, 'open_children', text(held)) end
    if held > 0 then redis.call('PERSIST', key) end
    for _, child in ipairs(children) do
      parent_ended(task_key(child), child, id, to, now, retention)
    end
  elseif held > 0 then
    redis.call('PERSIST', key)
  end
  if f[3] then workflow_closed(f[3], retention) end
end

dag_finished = function(key, id, to, now, retention)
  dag_queue[#dag_queue + 1] = { key, id, to }
  if dag_busy then return end
  dag_busy = true
  local i = 1
  while dag_queue[i] do
    local e = dag_queue[i]
    dag_ended(e[1], e[2], e[3], now, retention)
    i = i + 1
  end
  dag_queue, dag_busy = {}, false
end

-- `s` cut to at most `n` bytes without splitting a UTF-8 character.
local function clip(s, n)
  if #s <= n then return s end
  while n > 0 and string.byte(s, n + 1) >= 128 and string.byte(s, n + 1) < 192 do n = n - 1 end
  return string.sub(s, 1, n)
end

-- A stored number (a hash field's string, a number, or false) as JSON.
local function json_number(v)
  if type(v) == 'number' then return text(v) end
  if v and tonumber(v) then return v end
  return '0'
end

-- Histories shorter than this are appended to as text; longer ones are decoded and trimmed to
-- HISTORY_MAX entries. An entry is at least 94 bytes, so a history of HISTORY_MAX entries is
-- always past it.
local HISTORY_TRIM_BYTES = 8000

-- A string as JSON; a batch repeats the same few (its worker id, an empty error), so each is
-- encoded once.
local json_strings = { [''] = '""' }
local function json_string(s)
  local j = json_strings[s]
  if not j then
    j = cjson.encode(s)
    json_strings[s] = j
  end
  return j
end

-- Appends how one attempt ended to the task's history: a JSON array in the field `history`,
-- oldest first, at most HISTORY_MAX entries. `outcome` is one of succeeded, retry, failed,
-- cancelled, lease_expired, deadline, released.
-- `history` (the field's JSON, or false) with one more entry; the rest as attempt_ended. The
-- entry is written as text, not through cjson: decoding and re-encoding the list on every
-- completion was a visible part of the completion script's cost.
local function history_after(history, attempt, worker, started, now, outcome, err)
  local entry = '{"attempt":' .. json_number(attempt) .. ',"worker":' .. json_string(worker or '')
    .. ',"started_ms":' .. json_number(started) .. ',"ended_ms":' .. text(now)
    .. ',"outcome":"' .. outcome .. '","error":' .. json_string(clip(err or '', 1024)) .. '}'
  if not history or history == '' or history == '[]' then return '[' .. entry .. ']' end
  if #history < HISTORY_TRIM_BYTES then
    return string.sub(history, 1, -2) .. ',' .. entry .. ']'
  end
  local list = cjson.decode(history)
  list[#list + 1] = cjson.decode(entry)
  while #list > HISTORY_MAX do table.remove(list, 1) end
  return cjson.encode(list)
end

local function attempt_ended(key, now, outcome, err)
  local f = redis.call('HMGET', key, 'attempt', 'worker', 'started_ms', 'history')
  redis.call('HSET', key, 'history', history_after(f[4], f[1], f[2], f[3], now, outcome, err))
end

-- Whether a task of this queue and priority may not start now.
local function is_paused(queue, priority)
  return redis.call('SISMEMBER', PAUSED, 'queue:' .. queue) == 1
      or redis.call('SISMEMBER', PAUSED, 'priority:' .. priority) == 1
end

-- Adds `needs` (text) to what `worker` holds, or takes it away (sign -1); written at the end.
local function add_use(worker, needs, sign)
  local used = used_of(worker)
  for name, milli in pairs(amounts(needs)) do
    used[name] = math.max(0, (used[name] or 0) + sign * milli)
  end
  use_dirty[worker] = true
end

-- Whether `needs` (text) fits in what `worker` has left, by its reported capacity.
local function fits_on(worker, needs)
  local cap = capacity_cache[worker]
  if cap == nil then
    cap = redis.call('HGET', CAPACITY, worker)
    cap = cap and amounts(cap) or false
    capacity_cache[worker] = cap
  end
  if not cap then return false end
  local used = used_of(worker)
  for name, milli in pairs(amounts(needs)) do
    if (used[name] or 0) + milli > (cap[name] or 0) then return false end
  end
  return true
end

-- A dimension's wait list: tasks found over one of its limits, scored by arrival.
local function wait_list(dim)
  return FLOW_WAITS .. ':' .. dim
end

-- A dimension's running count as this script has it (read once, then kept up to date here;
-- written at the end by flush_later).
local flow_running = {}
local function running_of(dim)
  local n = flow_running[dim]
  if not n then
    n = tonumber(redis.call('HGET', FLOW_RUNNING, dim)) or 0
    flow_running[dim] = n
  end
  return n
end

local function hold(dims, sign)
  for _, dim in ipairs(dims) do
    flow_running[dim] = running_of(dim) + sign
    incr_later(FLOW_RUNNING, dim, sign)
  end
end

-- A slot of each of `dims` came free: the first task waiting for it (if any) goes back to the
-- inbox, to be placed if every limit of its lets it. A rate's wait list waits for tokens, which
-- the dispatcher hands out (unblock.lua).
local function wake(dims)
  local slots = {}
  for _, dim in ipairs(dims) do
    if string.sub(dim, 1, 5) ~= 'rate:' then slots[#slots + 1] = dim end
  end
  if #slots == 0 then return end
  local waiting = redis.call('SMISMEMBER', FLOW_WAITS, unpack(slots))
  for i, dim in ipairs(slots) do
    if waiting[i] == 1 then
      local list = wait_list(dim)
      local first = redis.call('ZPOPMIN', list)
      if first[1] then redis.call('ZADD', INBOX, 'NX', first[2], first[1]) end
      if redis.call('ZCARD', list) == 0 then redis.call('SREM', FLOW_WAITS, dim) end
    end
  end
end

-- The whole and partial tokens in rate dimension `dim`'s bucket at `now` (`limit` per `period`
-- ms, at most `burst`; a bucket never used is full). Stored as `<tokens>,<ms of last take>`.
local function bucket_tokens(dim, limit, period, burst, now)
  local tokens, last = burst, now
  local s = redis.call('HGET', FLOW_TOKENS, dim)
  if s then
    local t, l = string.match(s, '^([^,]+),(%d+)$')
    tokens, last = tonumber(t) or burst, tonumber(l) or now
  end
  return math.min(burst, tokens + math.max(0, now - last) * limit / period)
end

-- A rate limit's token is promised at placement (`<dim>|placed` in FLOW_TOKENS counts the
-- promises, which the place script counts as spent) and taken from the bucket at the start
-- (claim), so the starts, not the placements, are what a bucket bounds: a message that sits
-- on a lagging partition holds its promise and lets no extra task be placed meanwhile. The
-- task's `token` field names it: `<dim>\t<limit>\t<period>\t<burst>`.
local function promised(dim, by)
  local n = redis.call('HINCRBY', FLOW_TOKENS, dim .. '|placed', by)
  if n <= 0 then redis.call('HDEL', FLOW_TOKENS, dim .. '|placed') end
end

-- Tasks of a rate's wait list handed back to be placed (unblock.lua), still counted against its
-- tokens: `<n>,<ms>`, forgotten a second after the last hand-back (a task handed back and then
-- cancelled, or parked, must not hold the list up for long).
local HANDED_BACK_MS = 1000
local function handed_back(dim, now)
  local s = redis.call('HGET', FLOW_TOKENS, dim .. '|back')
  if not s then return 0 end
  local n, at = string.match(s, '^(%d+),(%d+)$')
  if not n or now - tonumber(at) > HANDED_BACK_MS then return 0 end
  return tonumber(n)
end

local function hand_back(dim, n, now)
  redis.call('HSET', FLOW_TOKENS, dim .. '|back', text(handed_back(dim, now) + n) .. ',' .. text(now))
end

-- One task of rate dimension `dim` left its queue (placed, or into a wait list): one handed-back
-- task less to count.
local function back_done(dim, now)
  local n = handed_back(dim, now)
  if n > 1 then
    local s = redis.call('HGET', FLOW_TOKENS, dim .. '|back')
    redis.call('HSET', FLOW_TOKENS, dim .. '|back', text(n - 1) .. string.match(s, ',%d+$'))
  elseif n == 1 then
    redis.call('HDEL', FLOW_TOKENS, dim .. '|back')
  end
end

-- The start of a task with a promised token: the token leaves its bucket.
local function take_token(key, now)
  local t = redis.call('HGET', key, 'token')
  if not t then return end
  local dim, limit, period, burst = string.match(t, '^([^\t]+)\t(%d+)\t(%d+)\t(%d+)$')
  if dim then
    local tokens = bucket_tokens(dim, tonumber(limit), tonumber(period), tonumber(burst), now) - 1
    redis.call('HSET', FLOW_TOKENS, dim, string.format('%.6f', tokens) .. ',' .. text(now))
    promised(dim, -1)
  end
  redis.call('HDEL', key, 'token')
end

-- Reserves a task's needs on `worker` and holds its flow dimensions (`flow`, its field); both
-- are bound to the task until `unreserve`.
local function reserve(key, id, worker, needs, flow)
  add_use(worker, needs, 1)
  redis.call('HSET', key, 'reserved_on', worker)
  redis.call('ZADD', RESERVED, 0, worker .. '|' .. id)
  if flow then hold(dims_of(flow), 1) end
end

-- Moves a reservation to `worker` (its flow dimensions stay held).
local function move_reservation(key, id, from, worker, needs)
  add_use(from, needs, -1)
  redis.call('ZREM', RESERVED, from .. '|' .. id)
  add_use(worker, needs, 1)
  redis.call('HSET', key, 'reserved_on', worker)
  redis.call('ZADD', RESERVED, 0, worker .. '|' .. id)
end

-- Releases whatever the task holds on a worker and under its flow dimensions (nothing if it
-- holds nothing), and wakes a task waiting for each slot that came free.
local function unreserve(key, id)
  local f = redis.call('HMGET', key, 'reserved_on', 'needs', 'flow', 'token')
  if not f[1] then return end
  add_use(f[1], f[2] or '', -1)
  redis.call('HDEL', key, 'reserved_on')
  redis.call('ZREM', RESERVED, f[1] .. '|' .. id)
  -- Placed but not started: the token promised to it goes back.
  if f[4] then
    promised(string.match(f[4], '^[^\t]+'), -1)
    redis.call('HDEL', key, 'token')
  end
  if f[3] then
    local dims = dims_of(f[3])
    hold(dims, -1)
    wake(dims)
  end
end

-- Whether the task waits in a limit's wait list (then it stays there).
local function blocked(key, id)
  local dim = redis.call('HGET', key, 'blocked_on')
  return dim and redis.call('ZSCORE', wait_list(dim), id) ~= false
end

-- Sends a placed task back to wait for a worker (it is pending; no message of it is due).
local function await_placement(key, id, now, reason)
  unreserve(key, id)
  -- NX: one already waiting keeps its place.
  if not blocked(key, id) then redis.call('ZADD', INBOX, 'NX', now, id) end
  redis.call('HSET', key, 'wait_reason', reason)
end

-- Records how long a placed task's successful attempt ran, for its kind (written at the end).
local function learn_run_time(key, now)
  local g = redis.call('HMGET', key, 'kind', 'started_ms')
  if not g[1] or not g[2] then return end
  local times = run_times_later[g[1]]
  if not times then times = {}; run_times_later[g[1]] = times end
  times[#times + 1] = string.format('%d', math.max(0, now - tonumber(g[2])))
end

-- Completions (complete.lua, and accept.lua for a success with follow-ups).
-- Whether a failed attempt may be retried: read only on that path, not for every outcome.
local function within_budget(key, current)
  local b = redis.call('HMGET', key, 'released', 'max_attempts')
  return current - tonumber(b[1]) < tonumber(b[2])
end
-- Records how one attempt ended: `kind` 'ok' | 'retry' | 'fail' | 'cancel', `body` the result
-- JSON or the error, `delay` the retry's delay ms, `is_placed` whether the task is placed (the
-- attempt releases what it reserved on its worker). Only the current attempt of the owning
-- worker may change a running task. Returns 'succeeded', 'scheduled', 'failed', 'cancelled',
-- 'already' or 'fenced' (see complete.lua).
local function complete_one(key, id, attempt, kind, body, delay, worker, retention, is_placed, now)
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
    if is_placed then
      flow = redis.call('HGET', key, 'flow')
      unreserve(key, id)
      if kind == 'ok' and not f[4] then learn_run_time(key, now) end
    end
    if f[4] then
      local note = 'cancelled while running'
      if kind ~= 'ok' and kind ~= 'cancel' then note = note .. '; handler reported: ' .. body end
      attempt_ended(key, now, 'cancelled', note)
      finish(key, id, 'running', 'cancelled', now, retention)
      return 'cancelled'
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
      return 'succeeded'
    elseif kind == 'retry' and within_budget(key, current) then
      attempt_ended(key, now, 'retry', body)
      delay = tonumber(delay)
      redis.call('HSET', key, 'state', 'scheduled', 'last_error', body, 'updated_ms', now,
        'run_at_ms', now + delay)
      redis.call('HDEL', key, 'deadline_ms')
      move(id, 'running', 'scheduled', now)
      zadd_later(DUE, now + delay, id)
      return 'scheduled'
    else
      attempt_ended(key, now, 'failed', body)
      fail(key, id, 'running', now, retention, body)
      return 'failed'
    end
  elseif state and TERMINAL[state] and current == attempt and f[3] == worker then
    return 'already'
  elseif kind == 'retry' and (state == 'scheduled' or state == 'pending') and current == attempt
      and f[3] == worker then
    -- A retried call whose first try scheduled this very retry (its reply was lost): recorded,
    -- not fenced. Only a handler's retry keeps the ended attempt's `worker`; a lease that
    -- expired, a release and a redrive remove it, so their attempts' late reports are fenced.
    return 'already'
  else
    return 'fenced'
  end
end
