-- Sorts placed tasks from the inbox into their queue's waiting sets, one per strategy, so that
-- a strategy change takes effect at once: `fifo` by arrival, `sjf` by estimate + arrival (a
-- later task passes an earlier one only if it arrived less than the difference of their
-- estimates after it), `fair` by start-time fair-queuing tag (a key's next task gets the later
-- of the queue's virtual time and that key's last tag, plus its step, so keys take turns: the
-- fair key is the task's tenant when it has one, with the step 1/weight, so a tenant of weight
-- 2 gets two starts for each of a tenant of weight 1 while both have tasks waiting).
-- A task that no longer waits (started from a duplicate delivery, cancelled, gone) is dropped.
-- KEYS  globals, the set of queues with waiting tasks, then per task: task hash, its queue's
--       fifo, sjf and fair sets, and its queue's fair state
-- ARGV  [1] tasks, then per task: id, queue, fair key ('' for keyless tasks), estimate ms, step
-- Returns how many tasks were sorted in.
local n = tonumber(ARGV[1])
local QUEUE_SET = KEYS[GLOBALS + 1]
local sorted = 0
for i = 0, n - 1 do
  local k = GLOBALS + 2 + i * 5
  local key, fifo, sjf, fair, state = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local a = 2 + i * 5
  local id, queue, fair_key, estimate = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local step = tonumber(ARGV[a + 4]) or 1
  local since = redis.call('ZSCORE', INBOX, id)
  if since then
    redis.call('ZREM', INBOX, id)
    local f = redis.call('HMGET', key, 'state', 'needs', 'reserved_on', 'blocked_on')
    -- One waiting in a limit's wait list stays there (a copy of its message sent it back).
    local in_wait_list = f[4] and redis.call('ZSCORE', wait_list(f[4]), id)
    if f[1] == 'pending' and f[2] and not f[3] and not in_wait_list then
      -- One still in its queue (a copy of its message reached a worker it did not fit)
      -- keeps its place.
      if not redis.call('ZSCORE', fifo, id) then
        since = tonumber(since)
        redis.call('ZADD', fifo, since, id)
        redis.call('ZADD', sjf, since + estimate, id)
        local g = redis.call('HMGET', state, 'vtime', 'key:' .. fair_key)
        local tag = math.max(tonumber(g[1]) or 0, tonumber(g[2]) or 0) + step
        redis.call('HSET', state, 'key:' .. fair_key, text(tag))
        redis.call('ZADD', fair, tag, id)
      end
      redis.call('SADD', QUEUE_SET, queue)
      sorted = sorted + 1
    end
  end
end
return sorted
