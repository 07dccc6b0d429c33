-- Parked tasks (see place.lua): back to the inbox, keeping their arrival, when the live workers
-- changed ('back'), or failed with their reason once their placement timeout ended ('expire').
-- A task no longer pending (cancelled, started from another copy of its message) just leaves.
-- KEYS  globals, then per task: task hash
-- ARGV  [1] tasks  [2] 'back' or 'expire'  [3] retention ms, then per task: id
-- Returns how many went back or failed.
local n, mode, retention = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local moved = 0
for i = 0, n - 1 do
  local key, id = KEYS[GLOBALS + 1 + i], ARGV[4 + i]
  local deadline = redis.call('ZSCORE', PARKED, id)
  if deadline then
    local f = redis.call('HMGET', key, 'state', 'wait_since', 'wait_reason')
    if f[1] ~= 'pending' then
      redis.call('ZREM', PARKED, id)
    elseif mode == 'back' then
      redis.call('ZREM', PARKED, id)
      redis.call('ZADD', INBOX, 'NX', tonumber(f[2]) or now, id)
      moved = moved + 1
    elseif tonumber(deadline) <= now then
      redis.call('ZREM', PARKED, id)
      fail(key, id, 'pending', now, retention, 'placement timeout: ' .. (f[3] or 'no worker took it'))
      moved = moved + 1
    end
  end
end
return moved
