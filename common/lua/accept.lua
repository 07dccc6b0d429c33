-- Records a batch of new submissions: `pending`, with an outbox entry for its first attempt
-- (published by the relay after redeliver_ms unless the scheduler's dispatch is acknowledged
-- first), or `scheduled`, with a timer, when run_at is in the future.
-- A known id or idempotency key returns the existing task instead.
-- KEYS  globals, then per task 3 keys: task hash, idempotency key (the task key when none),
--       queue index
-- ARGV  [1] tasks  [2] redeliver_ms  [3] idempotency window ms, then per task 11 values:
--       id, queue, priority, max_attempts, record json, has idempotency key (0/1), run_at ms (0: now),
--       delay ms (0: none; counted from Redis time here), timeout ms (0: none), kind,
--       traceparent
-- Returns per task one string: 'p' (new, pending), 's' (new, scheduled), or 'd' followed by the
-- existing task's id. A flat array of short strings, not a pair per task: the caller already
-- has each new task's id, and parsing nested replies was a tenth of the scheduler's CPU.
local n, redeliver, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local out, queues = {}, {}
for i = 0, n - 1 do
  local key, idem_key, queue_key = KEYS[GLOBALS + 1 + i * 3], KEYS[GLOBALS + 2 + i * 3], KEYS[GLOBALS + 3 + i * 3]
  local a = 4 + i * 11
  local id, queue, priority, max_attempts, record = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local has_idem, run_at, delay = ARGV[a + 5] == '1', tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  if delay > 0 then run_at = now + delay end
  local existing = has_idem and redis.call('GET', idem_key)
  if existing then
    out[#out + 1] = 'd' .. existing
  elseif redis.call('EXISTS', key) == 1 then
    out[#out + 1] = 'd' .. id
  else
    local state = 'pending'
    if run_at > now then state = 'scheduled' end
    -- Field order matters: a field is found by scanning the hash from its start, so the ones
    -- that claim and complete read and write go first.
    redis.call('HSET', key, 'state', state, 'attempt', '0', 'timeout_ms', ARGV[a + 8],
      'updated_ms', text(now), 'queue', queue, 'priority', priority, 'id', id, 'released', '0',
      'max_attempts', max_attempts, 'record', record, 'created_ms', text(now),
      'run_at_ms', text(math.max(run_at, now)), 'kind', ARGV[a + 9], 'trace', ARGV[a + 10])
    if state == 'pending' then
      zadd_later(OUTBOX, now + redeliver, outbox_member(id, '1'))
    else
      zadd_later(DUE, run_at, id)
    end
    zadd_later(IDX[state], now, id)
    zadd_later(queue_key, now, id)
    if not queues[queue] then
      queues[queue] = true
      redis.call('SADD', QUEUES, queue)
    end
    if has_idem then redis.call('SET', idem_key, id, 'PX', window) end
    out[#out + 1] = string.sub(state, 1, 1)
  end
end
return out
