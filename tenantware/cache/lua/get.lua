-- A tenant's cached entry, if live.
-- KEYS[1] values (hash: key -> sealed entry), KEYS[2] expiries (zset: key -> expiry ms)
-- ARGV[1] key
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not expires or tonumber(expires) <= now then
  return false
end
return redis.call('HGET', KEYS[1], ARGV[1])
