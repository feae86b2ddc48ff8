-- Settle one reservation: correct its window counters by the deltas, free its slot.
-- KEYS: as for reserve.lua.
-- ARGV: ticket, then five values per step (tenantware/quota/redis.py settle_args):
--   'n', key index, -, -, -            free the ticket's concurrency slot
--   'b', key index, -, -, delta        add delta to a prepaid balance
--   'w', key index, field, window, delta  add delta to a window counter still in that window
--                                      (one that has rolled over is left alone)
--   'r', key index, field, p1, -       a cancel: give a request back to a rate limit
local ticket = ARGV[1]
local fields, order, steps, at = {}, {}, {}, {}
for b = 2, #ARGV, 5 do
  local kind, k = ARGV[b], tonumber(ARGV[b + 1])
  if kind == 'n' then
    redis.call('ZREM', KEYS[k], ticket)
  elseif kind == 'b' then
    redis.call('HINCRBY', KEYS[k], 'v', ARGV[b + 4])
  else
    steps[#steps + 1] = b
    at[#at + 1] = want(fields, order, k, ARGV[b + 2])
  end
end
if #steps == 0 then return 1 end
local state = fetch(fields, order)
for j = 1, #steps do
  local b = steps[j]
  local key, f = KEYS[tonumber(ARGV[b + 1])], ARGV[b + 2]
  local value = state[tonumber(ARGV[b + 1])][at[j]]
  if ARGV[b] == 'w' then
    if value == ARGV[b + 3] then redis.call('HINCRBY', key, f .. '+', ARGV[b + 4]) end
  elseif value then
    redis.call('HSET', key, f, tonumber(value) - tonumber(ARGV[b + 3]))
  end
end
return 1
