-- What each limit of a plan has used now (for tests and the admin view).
-- KEYS: as for reserve.lua. ARGV: now_us (negative: use Redis TIME), then the plan (as for
-- reserve.lua).
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local n = tonumber(ARGV[2])
local kind, p1, ki, at = {}, {}, {}, {}
local fields, order = {}, {}
for i = 1, n do
  local b = 2 + (i - 1) * 5
  kind[i], p1[i], ki[i] = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 4])
  if kind[i] ~= 'n' and kind[i] ~= 'b' then
    at[i] = want(fields, order, ki[i], ARGV[b + 5])
    if kind[i] ~= 'r' then want(fields, order, ki[i], ARGV[b + 5] .. '+') end
  end
end
local state = fetch(fields, order)
local out = {}
for i = 1, n do
  local k, key = kind[i], KEYS[ki[i]]
  if k == 'r' then
    local tat = tonumber(state[ki[i]][at[i]]) or now
    out[i] = math.ceil(math.max(0, tat - now) / p1[i])
  elseif k == 'n' then
    out[i] = redis.call('ZCOUNT', key, now + 1, '+inf')
  elseif k == 'b' then
    out[i] = tonumber(redis.call('HGET', key, 'v')) or 0
  else
    local got = state[ki[i]]
    out[i] = 0
    if tonumber(got[at[i]]) == window_of(k, p1[i], now) then out[i] = tonumber(got[at[i] + 1]) or 0 end
  end
end
return out
