-- Reserve one request against every limit of a plan: all granted, or nothing written.
-- KEYS: one per limit, all in one hash slot (a caller may add keys after them).
-- ARGV[1]: MessagePack values (tenantware/backends/lua_args.py): now_us (negative: use Redis
--       TIME), tokens, cost (nano-USD), ticket, deadline_us (0: none;
--       tenantware/backends/redis_clock.py), charge (what a prepaid balance pays, nano-USD),
--       tokens and cost again as strings (written as they are), a day (days since 1970-01-01
--       UTC) and its month (months since 1970-01: tenantware/quota/plan.py, month_index), then
--       kind, p1, p2, key ttl per limit (Plan.packed). A monthly window is the month given when
--       now falls on the day given (the usual case: no calendar arithmetic here), else computed
--       (common.lua, month_index).
-- Reply: {allowed, failed index (0-based, -1), retry_after_us, now_us, remaining..., reset_us...}
--        or {-1, -1, 0, now_us} when now is past the deadline: the caller has given up,
--        nothing is checked or written. A grant also returns, as a second value, the time it
--        read from TIME (false when the caller gave it): a script that runs this one as a
--        function (tenantware/joint) hands it on; Redis replies with the first value only.
-- A number Redis stores is read with arithmetic (s + 0: one conversion; tonumber(s) makes two).
-- A time written as a string is formatted with '%d' (an integer: half the cost of handing
-- the number to redis.call, which formats it with '%.17g'); other numbers go as they are. Only what changes is written: a window counter gets its expiry when its
-- window starts (the expiry is the window's end either way), a request rate's key expires
-- after its tolerance (its arrival time is never further ahead); concurrency counts live slots
-- and sweeps the expired ones on about one call in 64 (the renewal never brings one back).
local v = {cmsgpack.unpack(ARGV[1])}
local now, tokens, cost, ticket, deadline, charge = v[1], v[2], v[3], v[4], v[5], v[6]
local tokens_s, cost_s, month_day, month = v[7], v[8], v[9], v[10]
local timed = false
if now < 0 then
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
  timed = now
end
if deadline > 0 and now > deadline then return {-1, -1, 0, now} end
local n = (#v - 10) / 4
-- The reply: {allowed, failed, retry, now, remaining (n), reset (n)}; staged: what a grant
-- writes per limit (a window counter's window: false when the window starts now).
local reply, staged = {0, -1, 0, now}, {}
local failed, budget_failed, retry = -1, -1, 0

for i = 1, n do
  local j = 4 * i + 7
  local kind, p1, p2 = v[j], v[j + 1], v[j + 2]
  local key = KEYS[i]
  local remaining, reset = 0, 0
  if kind == 'r' then
    local tat = redis.call('GET', key)
    if tat then tat = tat + 0 else tat = now end
    if tat < now then tat = now end
    local new = tat + p1
    if new - now > p2 then
      if failed < 0 then failed = i - 1 end
      if new - p2 - now > retry then retry = new - p2 - now end
      reset = tat - now
    else
      remaining = math.floor((p2 - (new - now)) / p1)
      reset = new - now
      staged[i] = new
    end
  elseif kind == 'n' then
    -- Live slots only (scores are whole µs); the expired ones are swept now and then.
    local held = redis.call('ZCOUNT', key, string.format('%d', now + 1), '+inf')
    if now % 64 == 0 then redis.call('ZREMRANGEBYSCORE', key, '-inf', now) end
    if held >= p2 then
      if failed < 0 then failed = i - 1 end
      if 1000000 > retry then retry = 1000000 end
      reset = 1000000
    else
      remaining = p2 - held - 1
    end
  elseif kind == 'b' then
    local balance = tonumber(redis.call('HGET', key, 'v')) or 0
    if balance <= 0 or balance < charge then
      remaining = math.max(0, balance)
      if budget_failed < 0 then budget_failed = i - 1 end
    else
      remaining = balance - charge
    end
  else
    local window
    if kind ~= 'm' then
      window = math.floor(now / p1)
      reset = (window + 1) * p1 - now
    elseif math.floor(now / 86400000000) == month_day then
      window = month
    else
      window = month_index(now)
    end
    local amount = cost
    if kind == 't' then amount = tokens end
    local state = redis.call('HMGET', key, 'w', 'v')
    local used = 0
    local same = state[1] and state[1] + 0 == window
    if same and state[2] then used = state[2] + 0 end
    if used + amount > p2 then
      remaining = math.max(0, p2 - used)
      if kind == 't' then
        if failed < 0 then failed = i - 1 end
        if reset > retry then retry = reset end
      elseif budget_failed < 0 then
        budget_failed = i - 1
      end
    else
      remaining = p2 - used - amount
      -- true: add to the counter; a number: the window starting now
      if same then staged[i] = true else staged[i] = window end
    end
  end
  reply[4 + i], reply[4 + n + i] = remaining, reset
end

if budget_failed >= 0 then
  reply[2], reply[3] = budget_failed, 0
  return reply
elseif failed >= 0 then
  reply[2], reply[3] = failed, retry
  return reply
else
  reply[1] = 1
  for i = 1, n do
    local j = 4 * i + 7
    local kind, p1 = v[j], v[j + 1]
    local key = KEYS[i]
    if kind == 'r' then
      redis.call('SET', key, string.format('%d', staged[i]), 'PX', v[j + 3])
    elseif kind == 'n' then
      redis.call('ZADD', key, string.format('%d', now + p1), ticket)
      redis.call('PEXPIRE', key, v[j + 3])
    elseif kind == 'b' then
      local left
      if charge > 0 then
        left = redis.call('HINCRBY', key, 'v', -charge)
      else
        left = tonumber(redis.call('HGET', key, 'v')) or 0
      end
      if left < p1 and redis.call('HSETNX', key, 'warned', '1') == 1 then reply[4 + n + i] = 1 end
    else
      local amount = cost_s
      if kind == 't' then amount = tokens_s end
      if staged[i] == true then
        redis.call('HINCRBY', key, 'v', amount)
      else
        redis.call('HSET', key, 'w', staged[i], 'v', amount)
        local ttl
        if kind == 'm' then ttl = 32 * 86400000 else ttl = math.ceil(reply[4 + n + i] / 1000) + 1000 end
        redis.call('PEXPIRE', key, ttl)
      end
    end
  end
end
return reply, timed
