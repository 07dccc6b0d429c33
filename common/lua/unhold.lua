-- Publishes held tasks again after a resume, or when the relay's sweep finds them: each that
-- is still held and pending and whose queue and priority are no longer paused leaves the held
-- set for the outbox, due now. The resume removes the paused selector first and then lists the
-- held set, so a task held by a claim racing the resume is always seen here. A task no longer
-- held was sent on by another call (a second resume, the sweep) and is left alone.
-- The attempt number is bumped without charging the budget (as a priority change does): the
-- message that was held is consumed, and a late acknowledgement of its dispatch must not
-- remove the new outbox entry, which it would if both named the same attempt.
-- KEYS  globals, then per task: task hash
-- ARGV  [1] tasks, then per task: id
-- Returns the number of tasks sent on.
local now = now_ms()
local sent = 0
for i = 0, tonumber(ARGV[1]) - 1 do
  local key, id = KEYS[GLOBALS + 1 + i], ARGV[2 + i]
  local f = redis.call('ZSCORE', HELD, id) and
    redis.call('HMGET', key, 'state', 'queue', 'priority', 'attempt')
  if not f then
    -- already sent on
  elseif f[1] ~= 'pending' then
    redis.call('ZREM', HELD, id)
  elseif not is_paused(f[2], f[3]) then
    local attempt = tonumber(f[4]) + 1
    redis.call('ZREM', HELD, id)
    redis.call('HSET', key, 'attempt', text(attempt), 'updated_ms', text(now))
    redis.call('HINCRBY', key, 'released', 1)
    redis.call('ZADD', OUTBOX, now, outbox_member(id, attempt + 1))
    sent = sent + 1
  end
end
return sent
