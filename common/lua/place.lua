-- Records a dispatcher's decisions for placed tasks waiting in their queue's sets (see
-- sort_in.lua). Two dispatchers may decide at once; here they are serialized: a task is placed
-- only while it still waits, and on a worker only while that worker is live and the task's
-- needs fit in what it has left, so no worker is ever promised more than its capacity. A
-- placed task holds a reservation on its worker (released when its attempt ends or the worker
-- is gone) and gets the outbox entry of its next attempt; the dispatcher then publishes it to
-- a partition of that worker.
-- KEYS  globals, the set of queues with waiting tasks, then per decision: task hash, its
--       queue's fifo, sjf and fair sets, and its queue's fair state
-- ARGV  [1] decisions  [2] redeliver ms  [3] live since (a worker last heard from before this
--       Redis time is not live)  [4] retention ms, then per decision: id, action ('p' place,
--       'w' wait, 'k' park: no live worker could take it even when idle, 'f' fail: waited past
--       its placement timeout, 'b' block: over a limit), worker (for 'p'; for 'k' when its
--       placement timeout ends, ms, or '' for none; for 'b' the dimension), reason (for 'w', 'k' and 'f'), queue, fair
--       key, checks (for 'p' and 'b': the limits it must be within, see flow.rs), flow (its
--       dimensions, for a task accepted before it had a `flow` field: then it is counted here)
-- Returns per decision: {attempt, record json, traceparent} when placed; 'gone' when it no
-- longer waits; 'full' when the worker is gone or the task no longer fits there; 'waiting';
-- 'parked'; 'failed'; 'limited' when over a limit (it moved to that limit's wait list).
-- A limit is checked here, atomically with the reservation, so no two dispatchers can both
-- take its last slot or token: at most `max` tasks of a dimension hold a reservation, and a
-- task is placed only if its rate's bucket holds a whole token beyond those already promised
-- to placed tasks (taken when they start, see prelude.lua's take_token).
-- A parked task leaves its queue for the parked set, so that tasks behind it are considered;
-- it returns to the inbox, with its arrival (`wait_since`), when the live workers change.
local n, redeliver, live_since, retention = tonumber(ARGV[1]), tonumber(ARGV[2]),
  tonumber(ARGV[3]), tonumber(ARGV[4])
local QUEUE_SET = KEYS[GLOBALS + 1]
local now = now_ms()
local out = {}

-- Token buckets read this call: rate dimension -> { free = tokens not promised yet }.
local buckets = {}
local function bucket(dim, limit, period, burst)
  local b = buckets[dim]
  if not b then
    local placed = tonumber(redis.call('HGET', FLOW_TOKENS, dim .. '|placed')) or 0
    b = { free = bucket_tokens(dim, limit, period, burst, now) - placed }
    buckets[dim] = b
  end
  return b
end

-- The first limit in `checks` the task is over (its dimension and why); or nil and the token
-- buckets a start takes from.
local function over_limit(checks)
  local takes = {}
  for line in string.gmatch(checks, '[^\n]+') do
    local kind, dim, a, b, c = string.match(line, '^(%a)\t([^\t]+)\t(%d+)\t?(%d*)\t?(%d*)$')
    if kind == 'c' then
      local running = running_of(dim)
      if running + 1 > tonumber(a) then
        return dim, 'concurrency limit of ' .. dim .. ' reached (' .. running .. ' of ' .. a .. ' running)'
      end
    elseif kind == 'r' then
      local bk = bucket(dim, tonumber(a), tonumber(b), tonumber(c))
      if bk.free < 1 then
        return dim, 'rate limit of ' .. dim .. ' (' .. a .. ' per ' .. b .. ' ms): waiting for a token'
      end
      takes[#takes + 1] = { bk = bk, dim = dim, token = line:sub(3) }
    end
  end
  return nil, nil, takes
end

-- Takes the task out of its queue's sets; a placed one moves the queue's fair clock on.
local function leave(id, k, queue, fair_key, placed)
  local fifo, sjf, fair, state = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local tag = redis.call('ZSCORE', fair, id)
  if tag then
    local field = 'key:' .. fair_key
    local g = redis.call('HMGET', state, 'vtime', field)
    local vtime = tonumber(g[1]) or 0
    if placed and tonumber(tag) > vtime then
      vtime = tonumber(tag)
      redis.call('HSET', state, 'vtime', tag)
    end
    -- A key's last tag the clock has reached need not be kept: the next task of the key gets
    -- the clock's time anyway. (A later one, of tasks still waiting, must stay.)
    if g[2] and tonumber(g[2]) <= vtime then redis.call('HDEL', state, field) end
  end
  redis.call('ZREM', fifo, id)
  redis.call('ZREM', sjf, id)
  redis.call('ZREM', fair, id)
  if redis.call('ZCARD', fifo) == 0 then
    redis.call('SREM', QUEUE_SET, queue)
    redis.call('DEL', state)
  end
end

for i = 0, n - 1 do
  local k, a = GLOBALS + 2 + i * 5, 5 + i * 8
  local takes
  local key = KEYS[k]
  local id, action, worker, reason = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local queue, fair_key = ARGV[a + 4], ARGV[a + 5]
  local f = redis.call('ZSCORE', KEYS[k + 1], id) and
    redis.call('HMGET', key, 'state', 'attempt', 'record', 'trace', 'needs', 'wait_reason',
      'reserved_on', 'flow')
  if not f then
    out[i + 1] = 'gone'
  elseif f[1] ~= 'pending' or not f[5] or f[7] then
    leave(id, k, queue, fair_key, false)
    out[i + 1] = 'gone'
  elseif action == 'b' or action == 'p' then
    local dim, why
    if ARGV[a + 6] ~= '' then dim, why, takes = over_limit(ARGV[a + 6]) end
    if not dim and action == 'b' and string.sub(worker, 1, 5) == 'rate:' then
      -- The dispatcher found no token; one came since it looked. Its wait list gives tasks
      -- back as tokens come (each round), so it waits there rather than at its queue's head,
      -- where a backlog of such tasks would hold up the tasks behind it.
      dim, why = worker, reason
    end
    if dim then
      -- Out of its queue into the limit's wait list, keeping its arrival: a slot that comes
      -- free, or a token, sends it back (see prelude.lua's wake and unblock.lua).
      local since = redis.call('ZSCORE', KEYS[k + 1], id)
      leave(id, k, queue, fair_key, false)
      redis.call('HSET', key, 'wait_reason', why, 'blocked_on', dim)
      redis.call('ZREM', INBOX, id)
      redis.call('ZADD', wait_list(dim), since, id)
      redis.call('SADD', FLOW_WAITS, dim)
      out[i + 1] = 'limited'
    elseif action == 'b' then
      -- Within its limits after all (a slot came free meanwhile): it waits in its queue.
      out[i + 1] = 'waiting'
    end
  end
  if out[i + 1] then
    -- decided above
  elseif action == 'w' then
    if f[6] ~= reason then redis.call('HSET', key, 'wait_reason', reason) end
    out[i + 1] = 'waiting'
  elseif action == 'k' then
    local since = redis.call('ZSCORE', KEYS[k + 1], id)
    leave(id, k, queue, fair_key, false)
    redis.call('HSET', key, 'wait_reason', reason, 'wait_since', since)
    redis.call('ZADD', PARKED, worker == '' and '+inf' or worker, id)
    out[i + 1] = 'parked'
  elseif action == 'f' then
    leave(id, k, queue, fair_key, false)
    fail(key, id, 'pending', now, retention, reason)
    out[i + 1] = 'failed'
  else
    local seen = redis.call('ZSCORE', WORKERS, worker)
    if not seen or tonumber(seen) < live_since or not fits_on(worker, f[5]) then
      out[i + 1] = 'full'
    else
      -- It holds no reservation: one that does is not waiting (see above).
      leave(id, k, queue, fair_key, true)
      local flow = f[8]
      if not flow and ARGV[a + 7] ~= '' then
        -- Accepted before tasks had a `flow` field: counted from here on, as queued too.
        flow = ARGV[a + 7]
        redis.call('HSET', key, 'flow', flow)
        for _, d in ipairs(dims_of(flow)) do incr_later(FLOW_QUEUED, d, 1) end
      end
      reserve(key, id, worker, f[5], flow)
      for _, t in ipairs(takes or {}) do
        t.bk.free = t.bk.free - 1
        promised(t.dim, 1)
        redis.call('HSET', key, 'token', t.token)
      end
      if f[6] then redis.call('HDEL', key, 'wait_reason') end
      redis.call('HSET', key, 'placed_ms', text(now))
      local attempt = tonumber(f[2]) + 1
      redis.call('ZADD', OUTBOX, now + redeliver, outbox_member(id, attempt))
      out[i + 1] = { attempt, f[3], f[4] or '' }
    end
  end
  if out[i + 1] == 'limited' or type(out[i + 1]) == 'table' then
    -- It left its queue: for each rate it is checked against, one handed-back task less.
    for line in string.gmatch(ARGV[a + 6], '[^\n]+') do
      local rate_dim = string.match(line, '^r\t([^\t]+)\t')
      if rate_dim then back_done(rate_dim, now) end
    end
  end
end
return out
