-- Settle one reservation: correct its window counters by the deltas, free its slot.
-- KEYS: as for reserve.lua.
-- ARGV[1]: MessagePack values (tenantware/backends/lua_args.py): as strings tokens_delta and
--       cost_delta, ticket, cancel (0/1), balance_delta (a string: what to add to a prepaid
--       balance, minus the charge delta), the window of each limit at the reservation (a
--       string, "" for a limit without windows: tenantware/quota/plan.py, windows_at), then
--       kind and p1 per limit (Plan.settle_packed). A window that has rolled over since the
--       reservation is left alone.
local v = {cmsgpack.unpack(ARGV[1])}
local tokens_delta, cost_delta, ticket, cancel, balance_delta = v[1], v[2], v[3], v[4], v[5]
local n = (#v - 5) / 3
for i = 1, n do
  local j = 2 * i + 4 + n
  local kind, p1 = v[j], v[j + 1]
  local key = KEYS[i]
  if kind == 'r' then
    if cancel == 1 then
      local tat = tonumber(redis.call('GET', key))
      if tat then redis.call('SET', key, tat - p1, 'KEEPTTL') end
    end
  elseif kind == 'n' then
    redis.call('ZREM', key, ticket)
  elseif kind == 'b' then
    if balance_delta ~= '0' then redis.call('HINCRBY', key, 'v', balance_delta) end
  else
    local delta = cost_delta
    if kind == 't' then delta = tokens_delta end
    if delta ~= '0' and redis.call('HGET', key, 'w') == v[5 + i] then
      redis.call('HINCRBY', key, 'v', delta)
    end
  end
end
return 1
