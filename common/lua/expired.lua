-- Lists members of a sorted set whose score (a deadline in ms) has passed, by Redis time.
-- KEYS  [1] sorted set
-- ARGV  [1] at most this many
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
