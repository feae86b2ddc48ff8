-- Reserve the quota and, only when every limit granted, acquire a seat: one script, one
-- round trip before the upstream (a single Redis; on a cluster the pool is another slot).
-- Composed when loaded (tenantware/joint/redis.py): quota_reserve is quota/lua/reserve.lua
-- (common.lua in front) and admission is admission/lua/admission.lua, each wrapped as a
-- function of (KEYS, ARGV); this dispatcher follows them.
-- KEYS: the reservation's, then the pool's. ARGV: the reservation's one argument, then the
-- acquire's three.
-- Reply: {reservation reply} when it did not grant (nothing asked of the pool: a refused
-- request takes no seat and no queue place), else {reservation reply, acquire reply}.
-- A reservation past its deadline writes nothing and answers -1, so neither half runs late.
-- The seat request takes the time the reservation read from TIME (in ms, as it reads it; a
-- TIME of its own costs about as much as a command), or reads TIME when the caller gave the
-- reservation its time.
local reserved, timed = quota_reserve(KEYS, ARGV)
if reserved[1] ~= 1 then return {reserved} end
local now_ms = timed and math.floor(timed / 1000)
return {reserved, admission({KEYS[#KEYS]}, {ARGV[2], ARGV[3], ARGV[4]}, now_ms)}
