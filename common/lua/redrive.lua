-- Sends failed tasks back for another round (redrive from the dead letters): each becomes
-- pending with a fresh budget of max_attempts, and the relay publishes it at once (its outbox
-- entry is due now). The attempt
-- number keeps growing, so any earlier attempt stays fenced; `released` counts the attempts not
-- charged against the budget (hand-backs, and every attempt before a redrive).
-- KEYS  globals, then per task: task hash
-- ARGV  [1] tasks, then per task: id
-- The failed totals of its queue and priority give the task back, so that they count tasks
-- that ended failed, not endings: a task redriven four times that then succeeds is one success.
-- Returns the number of tasks redriven (tasks that are not failed are left alone).
local now = now_ms()
local redriven = 0
for i = 0, tonumber(ARGV[1]) - 1 do
  local key, id = KEYS[GLOBALS + 1 + i], ARGV[2 + i]
  local f = redis.call('HMGET', key, 'state', 'attempt', 'queue', 'priority', 'flow', 'workflow',
    'parents')
  if f[1] == 'failed' then
    -- Open again in its workflow (its children that ended by its failure stay ended).
    if f[6] then workflow_opened(f[6]) end
    -- Its parents that ended are held for it again: its first end let them go, its next one
    -- will. (A task failed by a parent runs now, whatever its parents: an operator's choice.)
    if f[7] then
      for parent in string.gmatch(f[7], '[^\n]+') do
        local pk = task_key(parent)
        if TERMINAL[redis.call('HGET', pk, 'state') or ''] then hold_parent(pk, 1) end
      end
    end
    -- Queued again under its flow dimensions (finish counted it out).
    for _, dim in ipairs(dims_of(f[5])) do incr_later(FLOW_QUEUED, dim, 1) end
    incr_later(TOTALS, total_field('queue', 'failed', f[3] or '?'), -1)
    incr_later(TOTALS, total_field('priority', 'failed', f[4] or '?'), -1)
    redis.call('HSET', key, 'state', 'pending', 'released', f[2], 'updated_ms', now)
    redis.call('HINCRBY', key, 'redriven', 1)
    redis.call('HDEL', key, 'error', 'finished_ms', 'worker', 'deadline_ms')
    redis.call('PERSIST', key)
    move(id, 'failed', 'pending', now)
    redis.call('ZADD', OUTBOX, now, outbox_member(id, tonumber(f[2]) + 1))
    redriven = redriven + 1
  end
end
return redriven
