-- Settle one reservation: correct its window counters by the deltas, free its slot.
-- KEYS: as for reserve.lua.
-- ARGV: reserved_at_us, tokens_delta, cost_delta, ticket, cancel (0/1), balance_delta (what
--       to add to a prepaid balance: minus the charge delta), then the plan (as for
--       reserve.lua). A window that has rolled over since the reservation is left alone; a
--       cancel gives a request back to each rate limit.
local reserved_at = tonumber(ARGV[1])
local tokens_delta = ARGV[2]
local cost_delta = ARGV[3]
local ticket = ARGV[4]
local cancel = ARGV[5] == '1'
local balance_delta = ARGV[6]
local n = tonumber(ARGV[7])
local kind, p1, ki, field, at, delta = {}, {}, {}, {}, {}, {}
local fields, order = {}, {}
for i = 1, n do
  local b = 7 + (i - 1) * 5
  local k = ARGV[b + 1]
  kind[i], p1[i], ki[i], field[i] = k, tonumber(ARGV[b + 2]), tonumber(ARGV[b + 4]), ARGV[b + 5]
  if k == 'r' then
    if cancel then at[i] = want(fields, order, ki[i], field[i]) end
  elseif k == 'n' then
    redis.call('ZREM', KEYS[ki[i]], ticket)
  elseif k == 'b' then
    if balance_delta ~= '0' then redis.call('HINCRBY', KEYS[ki[i]], 'v', balance_delta) end
  else
    delta[i] = cost_delta
    if k == 't' then delta[i] = tokens_delta end
    if delta[i] ~= '0' then at[i] = want(fields, order, ki[i], field[i]) end
  end
end
if #order == 0 then return 1 end
local state = fetch(fields, order)
local writes, worder = {}, {}
for i = 1, n do
  if at[i] then
    local value = state[ki[i]][at[i]]
    if kind[i] == 'r' then
      if value then put(writes, worder, ki[i], field[i], int(tonumber(value) - p1[i]), 0, 0) end
    else
      local window = window_of(kind[i], p1[i], reserved_at)
      local used = used_in(value, window)
      if used then
        put(writes, worder, ki[i], field[i], int(window) .. ':' .. int(used + tonumber(delta[i])), 0, 0)
      end
    end
  end
end
store(writes, worder, state, 0)
return 1
