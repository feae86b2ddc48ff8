-- A prepaid balance: {1, balance} when held, {0, 0} when never credited nor restored.
-- KEYS: the balance hash.
local v = redis.call('HGET', KEYS[1], 'v')
if v then return {1, v} end
return {0, 0}
