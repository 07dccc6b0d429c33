-- Claims a batch of deliveries for one worker. A delivery claims its task only when the task is
-- pending and the delivery carries the next attempt; the attempt then becomes the fencing token
-- of every later heartbeat and completion. A task whose queue or priority is paused is held
-- instead (still pending, not started); resuming publishes it again.
-- A task with a timeout gets a hard deadline (start + timeout + grace): its lease is never
-- extended past it, so the reaper stops a handler that hangs yet still heartbeats.
-- A placed task starts only where it fits: on the worker it was reserved on, or on this one if
-- its labels match and its needs fit in what is left here (the reservation moves here);
-- otherwise it goes back to wait for placement, with no attempt used. One that holds no
-- reservation (a retry, a requeue, a hand-back) goes back to the dispatcher, which checks its
-- limits (see flow.rs).
-- KEYS  globals, then per delivery: task hash
-- ARGV  [1] deliveries  [2] worker id  [3] lease ms  [4] timeout grace ms  [5] call id (the
--       same for a retry of this call)  [6] placement: '' when no delivery is of a placed task
--       (the streaming path reads nothing more), else one character per delivery: '-' for a
--       streamed task, 'p' for a placed one whose labels this worker matches, 'x' for one whose
--       labels it does not; then per delivery: id, attempt
-- Returns per delivery: 1 claimed, 2 busy (that attempt is running on another worker), 3 stale
-- (an older attempt), 4 done (terminal), 5 future (an attempt beyond the next), 6 unknown task,
-- 7 not ready (scheduled, or running an older attempt), 8 held (paused), 9 owned (that attempt
-- was claimed by this very call: an earlier try of it ran but its reply was lost, or the
-- delivery came twice in it; the worker runs it unless it already does), 10 unfit (a placed
-- task that does not fit here: sent back to wait for placement).
local n, worker, lease, grace = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local call, placements = ARGV[5], ARGV[6]
local now = now_ms()
local now_text = text(now)
-- One SCARD per batch: the per-task pause checks run only while something is paused.
local any_paused = redis.call('SCARD', PAUSED) > 0
-- Likewise, held tasks and outbox entries are only looked for while there are any (a claim
-- only removes entries from either). The outbox entry of the claimed attempt goes: whether or
-- not its dispatch was acknowledged yet, the relay must not publish it again.
local any_held = redis.call('EXISTS', HELD) == 1
local any_outbox = redis.call('EXISTS', OUTBOX) == 1
local out = {}

-- Why a placed task cannot start on this worker, or nil when it can (its reservation then
-- stands on this worker).
local function unfit_here(key, id, placement)
  if placement == 'x' then return 'labels of worker ' .. worker .. ' do not match its require' end
  local f = redis.call('HMGET', key, 'reserved_on', 'needs', 'flow')
  if f[1] == worker then return nil end
  -- Not placed (a retry, a requeue, a hand-back, a redrive, or a copy of a message): only the
  -- dispatcher starts it, after checking its limits.
  if not f[1] and f[3] then return 'waits for the dispatcher to check its limits' end
  if not f[2] or not fits_on(worker, f[2]) then
    return 'did not fit worker ' .. worker .. ' when delivered there'
  end
  if f[1] then
    move_reservation(key, id, f[1], worker, f[2])
  else
    reserve(key, id, worker, f[2], false)
  end
  return nil
end

for i = 0, n - 1 do
  local a = 7 + i * 2
  local placement = ''
  if placements ~= '' then
    placement = string.sub(placements, i + 1, i + 1)
    if placement == '-' then placement = '' end
  end
  local key, id, attempt = KEYS[GLOBALS + 1 + i], ARGV[a], tonumber(ARGV[a + 1])
  -- Queue and priority are read only while something is paused (fields 4 and 5).
  local f
  if any_paused then
    f = redis.call('HMGET', key, 'state', 'attempt', 'timeout_ms', 'queue', 'priority')
  else
    f = redis.call('HMGET', key, 'state', 'attempt', 'timeout_ms')
  end
  local state, current = f[1], tonumber(f[2])
  local code
  if not state then code = 6
  elseif TERMINAL[state] then code = 4
  elseif attempt <= current then
    if state ~= 'running' or attempt ~= current then code = 3
    else
      -- Only the call that claimed it, not the worker: a worker restarted under the same id
      -- must not run its predecessor's attempt again (the lease runs out, then a new attempt).
      local g = redis.call('HMGET', key, 'worker', 'claim_call')
      if g[1] == worker and g[2] == call then code = 9 else code = 2 end
    end
  elseif attempt > current + 1 then code = 5
  elseif state ~= 'pending' then code = 7
  elseif any_paused and is_paused(f[4], f[5]) then
    zadd_later(HELD, now, id)
    if any_outbox then zrem_later(OUTBOX, outbox_member(id, ARGV[a + 1])) end
    -- A held task holds no room: placed again when resumed.
    if placement ~= '' then unreserve(key, id) end
    code = 8
  else
    local unfit = placement ~= '' and unfit_here(key, id, placement)
    if unfit then
      if any_outbox then zrem_later(OUTBOX, outbox_member(id, ARGV[a + 1])) end
      await_placement(key, id, now, unfit)
      code = 10
    else
      -- '0' (no timeout) is the usual value: tonumber costs a strtod.
      local timeout, expires = 0, now + lease
      if f[3] ~= '0' then timeout = tonumber(f[3]) or 0 end
      -- Neither `updated_ms` nor, on a first start, `first_started_ms` is written: both would
      -- repeat `started_ms` (Store::task fills them in), and every field a claim writes is
      -- bytes in the AOF and a listpack insert.
      local set = { 'state', 'running', 'attempt', ARGV[a + 1], 'worker', worker,
                    'started_ms', now_text, 'claim_call', call }
      local k = 10
      -- A task never claimed before (attempt 0, the usual case) has no leftover deadline:
      -- reading that absent field would scan the whole hash for nothing.
      local old_deadline = false
      if current > 0 then
        -- A later start: the first start is the `started_ms` this one overwrites, unless an
        -- earlier later start recorded it already (or no attempt ever started: now).
        local g = redis.call('HMGET', key, 'first_started_ms', 'deadline_ms', 'started_ms')
        old_deadline = g[2] ~= false
        if not g[1] then set[11] = 'first_started_ms'; set[12] = g[3] or now_text; k = 12 end
        -- A new attempt starts with no progress: an earlier attempt's would show on it.
        redis.call('HDEL', key, 'progress', 'progress_message', 'progress_ms')
      end
      if timeout > 0 then
        local deadline = now + timeout + grace
        set[k + 1] = 'deadline_ms'; set[k + 2] = text(deadline)
        expires = math.min(expires, deadline)
      elseif old_deadline then
        redis.call('HDEL', key, 'deadline_ms')
      end
      redis.call('HSET', key, unpack(set))
      zadd_later(LEASES, expires, id)
      if any_outbox then zrem_later(OUTBOX, outbox_member(id, ARGV[a + 1])) end
      if any_held then zrem_later(HELD, id) end
      if placement ~= '' then
        redis.call('ZREM', INBOX, id)
        redis.call('ZREM', PARKED, id)
        redis.call('HDEL', key, 'wait_reason')
        take_token(key, now)
      end
      move(id, 'pending', 'running', now)
      code = 1
    end
  end
  out[i + 1] = code
end
return out
