-- Settle the reservation and release the seat: one script, one call after the response (a
-- single Redis; on a cluster the pool is another slot and each layer makes its own call).
-- Composed when loaded (tenantware/joint/redis.py): quota_settle is quota/lua/settle.lua and
-- admission is admission/lua/admission.lua, each wrapped as a function of (KEYS, ARGV); this
-- dispatcher follows them.
-- KEYS: the settle's, then the pool's. ARGV: the settle's one argument, then the release's
-- three. Reply: the release's (the tickets it granted). Both halves or neither run.
quota_settle(KEYS, ARGV)
return admission({KEYS[#KEYS]}, {ARGV[2], ARGV[3], ARGV[4]})
