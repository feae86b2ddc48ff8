-- Settle one reservation: correct its window counters by the deltas, free its slot.
-- KEYS: as for reserve.lua.
-- ARGV[1]: MessagePack (tenantware/backends/lua_args.py): the plan's limits (as for
--       reserve.lua), then reserved_at_us, tokens_delta, cost_delta, ticket, cancel (0/1),
--       balance_delta (what to add to a prepaid balance: minus the charge delta).
--       A window that has rolled over since the reservation is left alone.
local plan, at, tokens_delta, cost_delta, ticket, cancel, balance_delta = cmsgpack.unpack(ARGV[1])
for i = 1, #plan / 3 do
  local kind, p1 = plan[3 * i - 2], plan[3 * i - 1]
  local key = KEYS[i]
  if kind == 'r' then
    if cancel == 1 then
      local tat = tonumber(redis.call('GET', key))
      if tat then redis.call('SET', key, tat - p1, 'KEEPTTL') end
    end
  elseif kind == 'n' then
    redis.call('ZREM', key, ticket)
  elseif kind == 'b' then
    if balance_delta ~= 0 then redis.call('HINCRBY', key, 'v', balance_delta) end
  else
    local delta = cost_delta
    if kind == 't' then delta = tokens_delta end
    if delta ~= 0 and tonumber(redis.call('HGET', key, 'w')) == window_of(kind, p1, at) then
      redis.call('HINCRBY', key, 'v', delta)
    end
  end
end
return 1
