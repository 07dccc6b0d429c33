-- Records the key-schema version of this fleet's data on first use and reports the version
-- found, so that no service runs against data written in a layout it does not know. Data in an
-- older layout this build still reads (ARGV[3] up to ARGV[1]) is marked as upgraded: from then
-- on services of the older version refuse to start, while those already running keep working
-- (each upgrade is chosen so that they may, see store/mod.rs).
-- KEYS[1]  schema hash
-- ARGV[1]  schema version this build writes   ARGV[2]  who is asking (service name)
-- ARGV[3]  oldest version this build upgrades in place
-- Returns  {version found, 1 if this call recorded it, 2 if it upgraded it, else 0}
local wanted, oldest = tonumber(ARGV[1]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local stored = tonumber(redis.call('HGET', KEYS[1], 'version'))
if not stored then
  redis.call('HSET', KEYS[1], 'version', wanted, 'created_ms', now, 'created_by', ARGV[2])
  return {wanted, 1}
end
if stored >= oldest and stored < wanted then
  redis.call('HSET', KEYS[1], 'version', wanted, 'upgraded_from', stored, 'upgraded_ms', now,
    'upgraded_by', ARGV[2])
  return {stored, 2}
end
return {stored, 0}
