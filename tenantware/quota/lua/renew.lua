-- Renew the concurrency slots this process holds: each one's expiry is pushed to a full
-- lease from now, so a slot outlives its lease only while its process is alive to renew it.
-- KEYS: the concurrency key of each slot (repeated for each ticket held under it); all in
--       one hash slot on a cluster.
-- ARGV: now_us (negative: use Redis TIME), then ticket, lease_us per key.
-- A slot already released, or expired (another request may have its place), is not brought
-- back. Reply: {slots renewed, now_us}.
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local renewed = 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local ticket, lease = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local expiry = tonumber(redis.call('ZSCORE', key, ticket))
  if expiry and expiry > now then
    redis.call('ZADD', key, int(now + lease), ticket)
    local keep = math.ceil(lease / 1000) + 1000
    if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, int(keep)) end
    renewed = renewed + 1
  end
end
return {renewed, now}
