-- Prepares entries taken by take_due.lua for publication. A timer (`due`, the bare task id) of a
-- scheduled task makes it pending and becomes the outbox entry of its next attempt, which stays
-- until Kafka acknowledges the message. An outbox entry whose attempt is still the next one is
-- published again (its earlier dispatch was never acknowledged). An entry whose task has moved
-- on is dropped. A timer of a pending task is an outbox entry written by an older Fleet (before
-- the outbox was keyed by attempt) and is treated the same way.
-- KEYS  globals, then per entry: task hash
-- ARGV  [1] entries, then per entry: member (`<id>` in due, `<id>#<attempt>` in the outbox), id
-- Returns per entry {id, attempt to publish, record json, traceparent}, or {id} when there is
-- nothing to send.
local now = now_ms()
local out = {}
for i = 0, tonumber(ARGV[1]) - 1 do
  local key, member, id = KEYS[GLOBALS + 1 + i], ARGV[2 + i * 2], ARGV[3 + i * 2]
  local wanted = tonumber(string.match(member, '#(%d+)$'))
  local set = DUE
  if wanted then set = OUTBOX end
  local score = redis.call('ZSCORE', set, member)
  local f = redis.call('HMGET', key, 'state', 'attempt', 'record', 'trace', 'needs')
  local next_attempt = (tonumber(f[2]) or 0) + 1
  if score and f[1] == 'scheduled' and not wanted and f[5] then
    -- A placed task whose time came: it waits for the dispatcher to choose its worker.
    redis.call('HSET', key, 'state', 'pending', 'updated_ms', now)
    move(id, 'scheduled', 'pending', now)
    redis.call('ZREM', DUE, member)
    redis.call('ZADD', INBOX, 'NX', now, id)
    out[#out + 1] = { id }
  elseif score and (f[1] == 'pending' or f[1] == 'scheduled') and (not wanted or wanted == next_attempt) then
    if f[1] == 'scheduled' then
      redis.call('HSET', key, 'state', 'pending', 'updated_ms', now)
      move(id, 'scheduled', 'pending', now)
    end
    if not wanted then
      -- take_due.lua already pushed the score past the redelivery hold: keep it.
      redis.call('ZREM', DUE, member)
      redis.call('ZADD', OUTBOX, score, outbox_member(id, next_attempt))
    end
    out[#out + 1] = { id, next_attempt, f[3], f[4] or '' }
  else
    redis.call('ZREM', set, member)
    out[#out + 1] = { id }
  end
end
return out
