-- Prepended to every transition script (see store/scripts.rs). KEYS[1..13] are the globals of
-- Keys::globals(): leases, due, dead outbox, the six state indexes, queues, workers, paused, held,
-- totals.
local LEASES, DUE, DEAD = KEYS[1], KEYS[2], KEYS[3]
local IDX = { pending = KEYS[4], scheduled = KEYS[5], running = KEYS[6],
              succeeded = KEYS[7], failed = KEYS[8], cancelled = KEYS[9] }
local QUEUES, WORKERS, PAUSED, HELD, TOTALS = KEYS[10], KEYS[11], KEYS[12], KEYS[13], KEYS[14]
local GLOBALS = 14
local TERMINAL = { succeeded = true, failed = true, cancelled = true }
-- Most entries a task's attempt history keeps (the oldest are dropped first).
local HISTORY_MAX = 100

-- Redis server time in ms: leases never depend on a client's clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Moves `id` from one state index to another.
local function move(id, from, to, now)
  redis.call('ZREM', IDX[from], id)
  redis.call('ZADD', IDX[to], now, id)
end

-- Ends a task in a terminal state: index, timestamps, totals per queue and priority, expiry
-- after the retention period.
local function finish(key, id, from, to, now, retention)
  local f = redis.call('HMGET', key, 'queue', 'priority')
  redis.call('HINCRBY', TOTALS, to .. ':queue:' .. (f[1] or '?'), 1)
  redis.call('HINCRBY', TOTALS, to .. ':priority:' .. (f[2] or '?'), 1)
  redis.call('HSET', key, 'state', to, 'finished_ms', now, 'updated_ms', now)
  redis.call('HDEL', key, 'deadline_ms')
  move(id, from, to, now)
  redis.call('PEXPIRE', key, retention)
end

-- Marks a task failed and queues its dead-letter record.
local function fail(key, id, from, now, retention, err)
  redis.call('HSET', key, 'error', err, 'last_error', err)
  finish(key, id, from, 'failed', now, retention)
  redis.call('ZADD', DEAD, now, id)
end

-- `s` cut to at most `n` bytes without splitting a UTF-8 character.
local function clip(s, n)
  if #s <= n then return s end
  while n > 0 and string.byte(s, n + 1) >= 128 and string.byte(s, n + 1) < 192 do n = n - 1 end
  return string.sub(s, 1, n)
end

-- Appends how one attempt ended to the task's history: a JSON array in the field `history`,
-- oldest first, at most HISTORY_MAX entries. `outcome` is one of succeeded, retry, failed,
-- cancelled, lease_expired, deadline, released.
local function attempt_ended(key, now, outcome, err)
  local f = redis.call('HMGET', key, 'attempt', 'worker', 'started_ms', 'history')
  local list = {}
  if f[4] and f[4] ~= '' then list = cjson.decode(f[4]) end
  list[#list + 1] = { attempt = tonumber(f[1]), worker = f[2] or '', started_ms = tonumber(f[3]) or 0,
                      ended_ms = now, outcome = outcome, error = clip(err or '', 1024) }
  if #list > HISTORY_MAX then table.remove(list, 1) end
  redis.call('HSET', key, 'history', cjson.encode(list))
end

-- Whether a task of this queue and priority may not start now.
local function is_paused(queue, priority)
  return redis.call('SISMEMBER', PAUSED, 'queue:' .. queue) == 1
      or redis.call('SISMEMBER', PAUSED, 'priority:' .. priority) == 1
end
