-- Keep a tenant's entry within its byte quota: expired entries go first, then the ones that
-- expire soonest (the oldest, with one TTL per tenant). Only this tenant's keys are touched.
-- KEYS[1] values (hash), KEYS[2] expiries (zset), KEYS[3] bytes used (string)
-- ARGV[1] key, ARGV[2] value, ARGV[3] ttl ms, ARGV[4] quota bytes
-- Returns 1 when stored, 0 when the entry alone exceeds the quota.
local key, value = ARGV[1], ARGV[2]
local ttl, quota = tonumber(ARGV[3]), tonumber(ARGV[4])
local size = #key + #value
if size > quota then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local used = tonumber(redis.call('GET', KEYS[3]) or '0')

local function drop(name)
  if redis.call('HEXISTS', KEYS[1], name) == 1 then
    used = used - #name - redis.call('HSTRLEN', KEYS[1], name)
    redis.call('HDEL', KEYS[1], name)
  end
  redis.call('ZREM', KEYS[2], name)
end

drop(key)
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  drop(name)
end
while used + size > quota do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then
    break
  end
  drop(oldest[1])
end
if used < 0 then
  used = 0
end
redis.call('HSET', KEYS[1], key, value)
redis.call('ZADD', KEYS[2], now + ttl, key)
redis.call('SET', KEYS[3], used + size)
-- The tenant's structures go with their last entry.
local latest = tonumber(redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2]) - now + 1000
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], latest)
end
return 1
