-- Moves a schedule on to its next occurrence, only if no other scheduler did it first (its
-- stored next occurrence is still the one this caller fired from), so replicas racing for the
-- same occurrences move it once. Firing itself is idempotent: each occurrence's task id is
-- derived from the schedule and the occurrence (see schedule.rs).
-- KEYS[1]  the schedules' next occurrences (sorted set)
-- ARGV[1]  schedule name  ARGV[2]  the occurrence fired from (ms)  ARGV[3]  the next one ('':
--          none, the schedule is done)
-- Returns  1 if moved, 0 if another caller had moved it (or it was paused or deleted).
local stored = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not stored or tonumber(stored) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
