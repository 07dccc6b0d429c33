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
--       its placement timeout), worker (for 'p'; for 'k' when its placement timeout ends, ms,
--       or '' for none), reason (for 'w', 'k' and 'f'), queue, fair key
-- Returns per decision: {attempt, record json, traceparent} when placed; 'gone' when it no
-- longer waits; 'full' when the worker is gone or the task no longer fits there; 'waiting';
-- 'parked'; 'failed'.
-- A parked task leaves its queue for the parked set, so that tasks behind it are considered;
-- it returns to the inbox, with its arrival (`wait_since`), when the live workers change.
local n, redeliver, live_since, retention = tonumber(ARGV[1]), tonumber(ARGV[2]),
  tonumber(ARGV[3]), tonumber(ARGV[4])
local QUEUE_SET = KEYS[GLOBALS + 1]
local now = now_ms()
local out = {}

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
  local k, a = GLOBALS + 2 + i * 5, 5 + i * 6
  local key = KEYS[k]
  local id, action, worker, reason = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local queue, fair_key = ARGV[a + 4], ARGV[a + 5]
  local f = redis.call('ZSCORE', KEYS[k + 1], id) and
    redis.call('HMGET', key, 'state', 'attempt', 'record', 'trace', 'needs', 'wait_reason',
      'reserved_on')
  if not f then
    out[i + 1] = 'gone'
  elseif f[1] ~= 'pending' or not f[5] or f[7] then
    leave(id, k, queue, fair_key, false)
    out[i + 1] = 'gone'
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
      reserve(key, id, worker, f[5])
      if f[6] then redis.call('HDEL', key, 'wait_reason') end
      redis.call('HSET', key, 'placed_ms', text(now))
      local attempt = tonumber(f[2]) + 1
      redis.call('ZADD', OUTBOX, now + redeliver, outbox_member(id, attempt))
      out[i + 1] = { attempt, f[3], f[4] or '' }
    end
  end
end
return out
