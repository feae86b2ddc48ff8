-- Credit a prepaid balance once per journal entry (retries from any replica apply once).
-- KEYS: the balance hash, the set of credited entry ids (one hash tag).
-- ARGV: entry id, amount (nano-USD), low-balance threshold (nano-USD).
-- Reply: the balance after.
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'v', ARGV[2])
end
local balance = tonumber(redis.call('HGET', KEYS[1], 'v')) or 0
if balance >= tonumber(ARGV[3]) then redis.call('HDEL', KEYS[1], 'warned') end
return int(balance)
