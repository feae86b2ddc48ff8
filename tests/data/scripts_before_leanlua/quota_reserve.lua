-- Reserve one request against every limit of a plan: all granted, or nothing written.
-- KEYS: one per limit, all in one hash slot.
-- ARGV: now_us (negative: use Redis TIME), tokens, cost (nano-USD), ticket,
--       then kind, p1, p2 per limit (see tenantware/quota/plan.py), then deadline_us
--       (0: none; tenantware/backends/redis_clock.py), then charge (what a prepaid balance
--       pays, nano-USD).
-- Reply: {allowed, failed index (0-based, -1), retry_after_us, now_us, remaining..., reset_us...}
--        or {-1, -1, 0, now_us} when now is past the deadline: the caller has given up,
--        nothing is checked or written.
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local deadline = tonumber(ARGV[5 + #KEYS * 3]) or 0
if deadline > 0 and now > deadline then return {-1, -1, 0, now} end
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local charge_arg = ARGV[6 + #KEYS * 3] or ARGV[3]
local charge = tonumber(charge_arg)
local ticket = ARGV[4]
local n = #KEYS
local remaining, reset, staged = {}, {}, {}
local failed, budget_failed, retry = -1, -1, 0

for i = 1, n do
  local base = 4 + (i - 1) * 3
  local kind, p1, p2 = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local key = KEYS[i]
  remaining[i], reset[i], staged[i] = 0, 0, 0
  if kind == 'r' then
    local tat = tonumber(redis.call('GET', key)) or now
    if tat < now then tat = now end
    local new = tat + p1
    if new - now > p2 then
      if failed < 0 then failed = i - 1 end
      if new - p2 - now > retry then retry = new - p2 - now end
      reset[i] = tat - now
    else
      remaining[i] = math.floor((p2 - (new - now)) / p1)
      reset[i] = new - now
      staged[i] = new
    end
  elseif kind == 'n' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
    local held = redis.call('ZCARD', key)
    if held >= p2 then
      if failed < 0 then failed = i - 1 end
      if 1000000 > retry then retry = 1000000 end
      reset[i] = 1000000
    else
      remaining[i] = p2 - held - 1
    end
  elseif kind == 'b' then
    local balance = tonumber(redis.call('HGET', key, 'v')) or 0
    if balance <= 0 or balance < charge then
      remaining[i] = math.max(0, balance)
      if budget_failed < 0 then budget_failed = i - 1 end
    else
      remaining[i] = balance - charge
    end
  else
    local window = window_of(kind, p1, now)
    if kind ~= 'm' then reset[i] = (window + 1) * p1 - now end
    local amount = cost
    if kind == 't' then amount = tokens end
    local state = redis.call('HMGET', key, 'w', 'v')
    local used = 0
    if tonumber(state[1]) == window then used = tonumber(state[2]) or 0 end
    if used + amount > p2 then
      remaining[i] = math.max(0, p2 - used)
      if kind == 't' then
        if failed < 0 then failed = i - 1 end
        if reset[i] > retry then retry = reset[i] end
      elseif budget_failed < 0 then
        budget_failed = i - 1
      end
    else
      remaining[i] = p2 - used - amount
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
  for i = 1, n do
    local base = 4 + (i - 1) * 3
    local kind, p1 = ARGV[base + 1], tonumber(ARGV[base + 2])
    local key = KEYS[i]
    if kind == 'r' then
      redis.call('SET', key, int(staged[i]), 'PX', int(math.ceil((staged[i] - now) / 1000) + 1))
    elseif kind == 'n' then
      redis.call('ZADD', key, int(now + p1), ticket)
      redis.call('PEXPIRE', key, int(math.ceil(p1 / 1000) + 1000))
    elseif kind == 'b' then
      local left = charge
      if charge > 0 then left = tonumber(redis.call('HINCRBY', key, 'v', '-' .. charge_arg)) end
      if charge <= 0 then left = tonumber(redis.call('HGET', key, 'v')) or 0 end
      if left < p1 and redis.call('HSETNX', key, 'warned', '1') == 1 then reset[i] = 1 end
    else
      local amount = cost
      if kind == 't' then amount = tokens end
      if tonumber(redis.call('HGET', key, 'w')) == staged[i] then
        redis.call('HINCRBY', key, 'v', int(amount))
      else
        redis.call('HSET', key, 'w', int(staged[i]), 'v', int(amount))
      end
      local ttl
      if kind == 'm' then ttl = 32 * 86400000 else ttl = math.ceil(reset[i] / 1000) + 1000 end
      redis.call('PEXPIRE', key, int(ttl))
    end
  end
end

local reply = {allowed, failed, retry, now}
for i = 1, n do reply[4 + i] = remaining[i] end
for i = 1, n do reply[4 + n + i] = reset[i] end
return reply
