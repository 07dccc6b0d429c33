-- Prepended to every transition script (see store/scripts.rs). KEYS[1..11] are the globals of
-- Keys::globals(): leases, due, dead outbox, the six state indexes, queues, workers.
local LEASES, DUE, DEAD = KEYS[1], KEYS[2], KEYS[3]
local IDX = { pending = KEYS[4], scheduled = KEYS[5], running = KEYS[6],
              succeeded = KEYS[7], failed = KEYS[8], cancelled = KEYS[9] }
local QUEUES, WORKERS = KEYS[10], KEYS[11]
local GLOBALS = 11
local TERMINAL = { succeeded = true, failed = true, cancelled = true }

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

-- Ends a task in a terminal state: index, timestamps, expiry after the retention period.
local function finish(key, id, from, to, now, retention)
  redis.call('HSET', key, 'state', to, 'finished_ms', now, 'updated_ms', now)
  move(id, from, to, now)
  redis.call('PEXPIRE', key, retention)
end

-- Marks a task failed and queues its dead-letter record.
local function fail(key, id, from, now, retention, err)
  redis.call('HSET', key, 'error', err, 'last_error', err)
  finish(key, id, from, 'failed', now, retention)
  redis.call('ZADD', DEAD, now, id)
end
