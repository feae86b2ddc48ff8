-- Set a balance Redis does not hold from the journal (its sum and its credit entry ids).
-- KEYS: the balance hash, the set of credited entry ids. ARGV: balance, then entry ids.
-- Reply: 1 when restored, 0 when a balance is held already.
if redis.call('HEXISTS', KEYS[1], 'v') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1])
for i = 2, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
return 1
