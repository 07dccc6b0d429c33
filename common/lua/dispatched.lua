-- Confirms that Kafka acknowledged the messages of a batch: the outbox entry of each task that
-- is still pending for exactly that attempt is removed, so the relay will not publish it again.
-- KEYS  globals, then per task: task hash
-- ARGV  [1] tasks, then per task: id, published attempt
-- Returns the number of tasks whose entry it removes.
local removed = 0
for i = 0, tonumber(ARGV[1]) - 1 do
  local key, id, attempt = KEYS[GLOBALS + 1 + i], ARGV[2 + i * 2], tonumber(ARGV[3 + i * 2])
  local fields = redis.call('HMGET', key, 'state', 'attempt')
  if fields[1] == 'pending' and tonumber(fields[2]) + 1 == attempt then
    zrem_later(DUE, id)
    removed = removed + 1
  end
end
return removed
