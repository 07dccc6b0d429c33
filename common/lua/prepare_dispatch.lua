-- Prepares due tasks (taken by take_due.lua) for publication: a scheduled task becomes pending;
-- a pending one is published again (its earlier dispatch was never confirmed); an entry whose
-- task has moved on is dropped.
-- KEYS  globals, then per task: task hash
-- ARGV  [1] tasks, then per task: id
-- Returns per task {id, attempt to publish, record json, traceparent}, or {id} when there is
-- nothing to send.
local now = now_ms()
local out = {}
for i = 0, tonumber(ARGV[1]) - 1 do
  local key, id = KEYS[GLOBALS + 1 + i], ARGV[2 + i]
  local f = redis.call('HMGET', key, 'state', 'attempt', 'record', 'trace')
  if redis.call('ZSCORE', DUE, id) and (f[1] == 'pending' or f[1] == 'scheduled') then
    if f[1] == 'scheduled' then
      redis.call('HSET', key, 'state', 'pending', 'updated_ms', now)
      move(id, 'scheduled', 'pending', now)
    end
    out[#out + 1] = { id, tonumber(f[2]) + 1, f[3], f[4] or '' }
  else
    redis.call('ZREM', DUE, id)
    out[#out + 1] = { id }
  end
end
return out
