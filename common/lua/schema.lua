-- Records the key-schema version of this fleet's data on first use and reports the version
-- found, so that no service runs against data written in a layout it does not know.
-- KEYS[1]  schema hash
-- ARGV[1]  schema version this build writes   ARGV[2]  who is asking (service name)
-- Returns  {stored version, 1 if this call recorded it else 0}
local stored = redis.call('HGET', KEYS[1], 'version')
if stored then
  return {tonumber(stored), 0}
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'version', ARGV[1],
  'created_ms', now[1] * 1000 + math.floor(now[2] / 1000), 'created_by', ARGV[2])
return {tonumber(ARGV[1]), 1}
