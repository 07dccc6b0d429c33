-- Moves a task that has not started to another priority. The caller rewrites the stored record
-- (the payload stays byte for byte); this script swaps it in only if the task is still pending
-- or scheduled (or waiting for its parents) and the record is the one the caller read. The attempt number is bumped without
-- charging the budget, which fences the message already on the old priority's topic; a pending
-- task is then published again, on the new topic, at once.
-- KEYS  globals, then the task hash
-- ARGV  [1] id  [2] record the caller read  [3] new record  [4] new priority
-- Returns 'moved', 'conflict' (the record changed meanwhile: read again), the state that
-- prevents it ('running', 'succeeded', 'failed', 'cancelled'), or 'unknown'.
local key, id = KEYS[GLOBALS + 1], ARGV[1]
local now = now_ms()
local f = redis.call('HMGET', key, 'state', 'record', 'attempt')
if not f[1] then return 'unknown' end
if f[1] ~= 'pending' and f[1] ~= 'scheduled' and f[1] ~= 'waiting' then return f[1] end
if f[2] ~= ARGV[2] then return 'conflict' end
redis.call('HSET', key, 'record', ARGV[3], 'priority', ARGV[4], 'updated_ms', now)
-- A task waiting for its parents has no message anywhere yet: its release publishes the new
-- record.
if f[1] == 'waiting' then return 'moved' end
redis.call('HINCRBY', key, 'attempt', 1)
redis.call('HINCRBY', key, 'released', 1)
-- A scheduled task keeps its timer: the relay publishes whatever attempt is next when it fires.
if f[1] == 'pending' then
  local attempt = tonumber(f[3])
  redis.call('ZREM', HELD, id)
  redis.call('ZREM', OUTBOX, outbox_member(id, attempt + 1))
  redis.call('ZADD', OUTBOX, now, outbox_member(id, attempt + 2))
end
return 'moved'
