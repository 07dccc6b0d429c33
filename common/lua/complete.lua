-- Records the outcomes of a batch of attempts. Only the current attempt of the owning worker
-- may change a running task; anything else is fenced and changes nothing. A task whose
-- cancellation was requested ends `cancelled` whatever its handler reported, so a cancel that
-- was answered `cancelling` always wins the race with the completion.
-- KEYS  globals, then per outcome: task hash
-- ARGV  [1] outcomes  [2] worker id  [3] retention ms  [4] placed: '' when no outcome is of a
--       placed task, else one character per outcome, '1' for a placed task (the ending attempt
--       releases what it reserved on the worker), '0' otherwise; then per outcome 5 values: id,
--       attempt, kind ('ok' | 'retry' | 'fail' | 'cancel'), body (result json or error), retry
--       delay ms
-- Returns per outcome: 'succeeded', 'scheduled' (retry), 'failed', 'cancelled', 'already'
-- (this attempt already ended the task, or already scheduled its retry), or 'fenced'.
local n, worker, retention, placed = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now = now_ms()
local out = {}
for i = 0, n - 1 do
  local a = 5 + i * 5
  -- `body`: the result JSON or the error (not `text`, which is the prelude's number formatter).
  out[i + 1] = complete_one(KEYS[GLOBALS + 1 + i], ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2],
    ARGV[a + 3], ARGV[a + 4], worker, retention, placed ~= '' and string.sub(placed, i + 1, i + 1) == '1', now)
end
return out
