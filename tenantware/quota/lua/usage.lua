-- What each limit of a plan has used now (for tests and the admin view).
-- KEYS/ARGV: as for reserve.lua (tokens, cost and ticket unused).
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local out = {}
for i = 1, #KEYS do
  local base = 4 + (i - 1) * 3
  local kind, p1 = ARGV[base + 1], tonumber(ARGV[base + 2])
  local key = KEYS[i]
  if kind == 'r' then
    local tat = tonumber(redis.call('GET', key)) or now
    out[i] = math.ceil(math.max(0, tat - now) / p1)
  elseif kind == 'n' then
    out[i] = redis.call('ZCOUNT', key, '(' .. int(now), '+inf')
  elseif kind == 'b' then
    out[i] = tonumber(redis.call('HGET', key, 'v')) or 0
  else
    local state = redis.call('HMGET', key, 'w', 'v')
    if tonumber(state[1]) == window_of(kind, p1, now) then
      out[i] = tonumber(state[2]) or 0
    else
      out[i] = 0
    end
  end
end
return out
