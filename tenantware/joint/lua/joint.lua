-- Reserve the quota and, only when every limit granted, acquire a seat: one script, one
-- round trip before the upstream (a single Redis; on a cluster the pool is another slot).
-- Composed when loaded (tenantware/joint/redis.py): quota_reserve is quota/lua/reserve.lua
-- (common.lua in front) and admission is admission/lua/admission.lua, each wrapped as a
-- function of (KEYS, ARGV); this dispatcher follows them.
-- KEYS: the reservation's, then the pool's. ARGV: how many KEYS and ARGV the reservation
-- takes, its ARGV, then the acquire's ARGV.
-- Reply: {reservation reply} when it did not grant (nothing asked of the pool: a refused
-- request takes no seat and no queue place), else {reservation reply, acquire reply}.
-- A reservation past its deadline writes nothing and answers -1, so neither half runs late.
local nkeys, nargs = tonumber(ARGV[1]), tonumber(ARGV[2])
local reserve_keys, reserve_args, pool_keys, acquire_args = {}, {}, {}, {}
for i = 1, nkeys do reserve_keys[i] = KEYS[i] end
for i = nkeys + 1, #KEYS do pool_keys[#pool_keys + 1] = KEYS[i] end
for i = 1, nargs do reserve_args[i] = ARGV[2 + i] end
for i = 3 + nargs, #ARGV do acquire_args[#acquire_args + 1] = ARGV[i] end
local reserved = quota_reserve(reserve_keys, reserve_args)
if reserved[1] ~= 1 then return {reserved} end
return {reserved, admission(pool_keys, acquire_args)}
