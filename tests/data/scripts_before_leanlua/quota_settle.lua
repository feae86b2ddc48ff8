-- Settle one reservation: correct its window counters by the deltas, free its slot.
-- KEYS: as for reserve.lua.
-- ARGV: reserved_at_us, tokens_delta, cost_delta, ticket, cancel (0/1), then kind, p1, p2
--       per limit, then balance_delta (what to add to a prepaid balance: minus the charge
--       delta). A window that has rolled over since the reservation is left alone.
local at = tonumber(ARGV[1])
local tokens_delta = ARGV[2]
local cost_delta = ARGV[3]
local ticket = ARGV[4]
local cancel = ARGV[5] == '1'
local balance_delta = ARGV[6 + #KEYS * 3] or '0'
for i = 1, #KEYS do
  local base = 5 + (i - 1) * 3
  local kind, p1 = ARGV[base + 1], tonumber(ARGV[base + 2])
  local key = KEYS[i]
  if kind == 'r' then
    if cancel then
      local tat = tonumber(redis.call('GET', key))
      if tat then redis.call('SET', key, int(tat - p1), 'KEEPTTL') end
    end
  elseif kind == 'n' then
    redis.call('ZREM', key, ticket)
  elseif kind == 'b' then
    if balance_delta ~= '0' then redis.call('HINCRBY', key, 'v', balance_delta) end
  else
    local delta = cost_delta
    if kind == 't' then delta = tokens_delta end
    if delta ~= '0' and tonumber(redis.call('HGET', key, 'w')) == window_of(kind, p1, at) then
      redis.call('HINCRBY', key, 'v', delta)
    end
  end
end
return 1
