-- Reserve one request against every limit of a plan: all granted, or nothing written.
-- KEYS: the plan's keys (Plan.keys: its counters hash, concurrency sets, balance), all in
--       one hash slot.
-- ARGV: now_us (negative: use Redis TIME), tokens, cost (nano-USD), ticket, deadline_us
--       (0: none; tenantware/backends/redis_clock.py), charge (what a prepaid balance pays,
--       nano-USD), then the plan (Plan.args: the number of limits, then kind, p1, p2, key
--       index, field per limit; see tenantware/quota/plan.py).
-- State (common.lua): each counters hash is read once (HMGET) and, on a grant, written once
--       (HSET), its expiry extended when a field needs it longer.
-- Reply: {allowed, failed index (0-based, -1), retry_after_us, now_us, remaining..., reset_us...}
--        or {-1, -1, 0, now_us} when now is past the deadline: the caller has given up,
--        nothing is checked or written.
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local deadline = tonumber(ARGV[5])
if deadline > 0 and now > deadline then return {-1, -1, 0, now} end
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local ticket = ARGV[4]
local charge_arg = ARGV[6]
local charge = tonumber(charge_arg)
local n = tonumber(ARGV[7])
local kind, p1, p2, ki, field, at = {}, {}, {}, {}, {}, {}
local fields, order = {}, {}
for i = 1, n do
  local b = 7 + (i - 1) * 5
  local k = ARGV[b + 1]
  kind[i], p1[i], p2[i] = k, tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  ki[i], field[i] = tonumber(ARGV[b + 4]), ARGV[b + 5]
  if k == 'r' then
    at[i] = want(fields, order, ki[i], field[i])
  elseif k ~= 'n' and k ~= 'b' then
    at[i] = want(fields, order, ki[i], field[i])
    want(fields, order, ki[i], field[i] .. '+') -- at[i] + 1
  end
end
local state = fetch(fields, order)

local remaining, reset, staged, used = {}, {}, {}, {}
local failed, budget_failed, retry = -1, -1, 0
for i = 1, n do
  local k = kind[i]
  remaining[i], reset[i], staged[i] = 0, 0, 0
  if k == 'r' then
    local tat = tonumber(state[ki[i]][at[i]]) or now
    if tat < now then tat = now end
    local new = tat + p1[i]
    if new - now > p2[i] then
      if failed < 0 then failed = i - 1 end
      if new - p2[i] - now > retry then retry = new - p2[i] - now end
      reset[i] = tat - now
    else
      remaining[i] = math.floor((p2[i] - (new - now)) / p1[i])
      reset[i] = new - now
      staged[i] = new
    end
  elseif k == 'n' then
    -- Live slots only (expired ones are swept by renew.lua and by the set's own expiry).
    local held = redis.call('ZCOUNT', KEYS[ki[i]], now + 1, '+inf') -- expiry > now
    if held >= p2[i] then
      if failed < 0 then failed = i - 1 end
      if 1000000 > retry then retry = 1000000 end
      reset[i] = 1000000
    else
      remaining[i] = p2[i] - held - 1
    end
  elseif k == 'b' then
    local balance = tonumber(redis.call('HGET', KEYS[ki[i]], 'v')) or 0
    if balance <= 0 or balance < charge then
      remaining[i] = math.max(0, balance)
      if budget_failed < 0 then budget_failed = i - 1 end
    else
      remaining[i] = balance - charge
    end
  else
    local window = window_of(k, p1[i], now)
    if k ~= 'm' then reset[i] = (window + 1) * p1[i] - now end
    local amount = cost
    if k == 't' then amount = tokens end
    local got = state[ki[i]]
    used[i] = 0
    if tonumber(got[at[i]]) == window then used[i] = tonumber(got[at[i] + 1]) or 0 end
    if used[i] + amount > p2[i] then
      remaining[i] = math.max(0, p2[i] - used[i])
      if k == 't' then
        if failed < 0 then failed = i - 1 end
        if reset[i] > retry then retry = reset[i] end
      elseif budget_failed < 0 then
        budget_failed = i - 1
      end
    else
      remaining[i] = p2[i] - used[i] - amount
      staged[i] = window
    end
  end
end

local allowed = 1
if budget_failed >= 0 then
  allowed, failed, retry = 0, budget_failed, 0
elseif failed >= 0 then
  allowed = 0
else
  local writes, worder = {}, {}
  for i = 1, n do
    local k = kind[i]
    local key = KEYS[ki[i]]
    if k == 'r' then
      local need = math.ceil((staged[i] - now) / 1000) + 1
      put(writes, worder, ki[i], field[i], staged[i], need, math.ceil(p2[i] / 1000) + 1)
    elseif k == 'n' then
      redis.call('ZADD', key, now + p1[i], ticket)
      redis.call('PEXPIRE', key, math.ceil(p1[i] / 1000) + 1000)
    elseif k == 'b' then
      local left = charge
      if charge > 0 then left = tonumber(redis.call('HINCRBY', key, 'v', '-' .. charge_arg)) end
      if charge <= 0 then left = tonumber(redis.call('HGET', key, 'v')) or 0 end
      if left < p1[i] and redis.call('HSETNX', key, 'warned', '1') == 1 then reset[i] = 1 end
    else
      local amount = cost
      if k == 't' then amount = tokens end
      local need, keep
      if k == 'm' then
        need, keep = 32 * 86400000, 32 * 86400000
      else
        need, keep = math.ceil(reset[i] / 1000) + 1000, math.ceil(p1[i] / 1000) + 1000
      end
      put(writes, worder, ki[i], field[i], staged[i], need, keep)
      put(writes, worder, ki[i], field[i] .. '+', used[i] + amount, need, keep)
    end
  end
  store(writes, worder, state, math.floor(now / 1000))
end

local reply = {allowed, failed, retry, now}
for i = 1, n do reply[4 + i] = remaining[i] end
for i = 1, n do reply[4 + n + i] = reset[i] end
return reply
