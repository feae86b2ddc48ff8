-- Fair-share admission of one seat pool: the rules of tenantware/admission/core.py in Redis.
-- One script, one decision per call (ARGV[1] = op). Every key of the pool shares the hash tag
-- of KEYS[1] (the pool, not a tenant: a decision compares all tenants of the pool), so the
-- per-tenant queue keys built below live in the same slot and the script runs on a cluster.
-- Time comes from Redis TIME (ms; see now below). Seats are leases with an expiry: a dead
-- process's seats come back by themselves; queued tickets carry a heartbeat the waiting
-- process refreshes.
--
-- ARGV: op, then MessagePack (tenantware/backends/lua_args.py): the pool's terms (seats,
-- rate in tokens/s (0: none), burst in tokens, the bands' steps (1 / share) as one array,
-- headroom in seats, short_s, linger_s), then the op's own arguments as a third string.
-- Times in ms are written with string.format('%d') (half the cost of handing the number to
-- redis.call, which formats it with '%.17g'); counters stay written with tostring, as before.

local base = KEYS[1]
local K_SEATS = base .. ':seats'    -- zset lease(ticket id) -> expiry ms
local K_LEASE = base .. ':lease'    -- hash ticket -> tenant (granted tickets)
local K_HELD = base .. ':held'      -- hash tenant -> seats held
local K_CTR = base .. ':ctr'        -- hash tenant -> virtual counter
local K_SYS = base .. ':sys'        -- hash: vt, bvt, w (waiting), b1..bn, lvl/lts (bucket),
                                    -- aw (weight sum of the active tenants)
local K_LEFT = base .. ':left'      -- zset tenant -> ms it went idle (lingering, still active)

local op = ARGV[1]
local seats, rate, burst, steps, headroom, short_s, linger_s = cmsgpack.unpack(ARGV[2])
local nbands = #steps
local linger_ms = linger_s * 1000
if headroom > seats - 1 then headroom = seats - 1 end -- one seat stays open to everyone

-- Redis time in ms: TIME, or now_ms when a script that runs this one as a function read it
-- in the same run (tenantware/joint: the reservation's); alone, now_ms is declared nil in
-- front of this script (tenantware/admission/redis.py). A release reads it only if it needs
-- it (a TIME costs about as much as a command). Helpers are made only where a call needs
-- them (a closure costs 1-2 k instructions).
-- A number Redis stores is read with arithmetic (s + 0: one conversion; tonumber(s) makes
-- two); num: the same, 0 for a missing value.
local function num(v) if v then return v + 0 end return 0 end
local now, redis_ms, take_tokens = now_ms, nil, nil
if not now then
  redis_ms = function()
    local t = redis.call('TIME')
    return t[1] * 1000 + math.floor(t[2] / 1000)
  end
  if op ~= 'release' then now = redis_ms() end
end
if rate > 0 then
  take_tokens = function(tokens)
    if tokens ~= 0 then
      local lvl = redis.call('HGET', K_SYS, 'lvl')
      if lvl then lvl = tonumber(lvl) else lvl = burst end
      redis.call('HSET', K_SYS, 'lvl', tostring(math.min(burst, lvl - tokens)))
    end
  end
end

-- A release frees its seat here, before the helpers below are made: with nobody waiting
-- (the usual case) that is all it does; expired seats and idle tenants are left to the next
-- acquire, which sweeps them before it decides.
local released, released_held, waiting
if op == 'release' then
  -- ticket, tenant, band, cost, weight, actual_cost, lease_ms, tokens, actual_tokens
  local ticket, tenant, _, cost, weight, actual, _, tokens, actual_tokens =
    cmsgpack.unpack(ARGV[3])
  waiting = num(redis.call('HGET', K_SYS, 'w'))
  released = redis.call('ZREM', K_SEATS, ticket) == 1
  if released then
    released_held = redis.call('HINCRBY', K_HELD, tenant, '-1')
    redis.call('HDEL', K_LEASE, ticket)
    local c = num(redis.call('HGET', K_CTR, tenant))
    redis.call('HSET', K_CTR, tenant, tostring(c + (actual - cost) / weight))
    if take_tokens then take_tokens(actual_tokens - tokens) end
    if waiting == 0 and released_held <= 0 then
      now = now or redis_ms()
      redis.call('ZADD', K_LEFT, string.format('%d', now), tenant)
    end
  end
  if waiting == 0 then return {} end
end
now = now or redis_ms()

-- The usual seat request, decided before the helpers below are made (a closure costs 1-2 k
-- instructions, the queue's maker about 11 k): nobody queued, no seat expired, no tenant to
-- expire, the tenant active with this weight and known to the pool (it has a counter), no
-- reservation in the pool, no rate, and a seat that fits (fits below, with nobody
-- reserving). It then writes what the general path (op == 'acquire' below) writes in that
-- case (grant below, without the token bucket); otherwise it writes nothing and the general
-- path decides.
if op == 'acquire' then
  local ticket, tenant, _, cost, weight, reserved, cap, _, lease_ms, _, _, hold, deadline =
    cmsgpack.unpack(ARGV[3])
  if deadline > 0 and now > deadline then return {4, now} end
  if rate <= 0 and reserved == 0 then
    local sys = redis.call('HMGET', K_SYS, 'w', 'aw', 'vt')
    if num(sys[1]) == 0
      and #redis.call('ZRANGEBYSCORE', K_SEATS, '-inf', string.format('%d', now)) == 0
      and #redis.call('ZRANGEBYSCORE', K_LEFT, '-inf', string.format('%d', now - linger_ms)) == 0
      and num(redis.call('HGET', base .. ':w', tenant)) == weight
      and redis.call('SCARD', base .. ':res') == 0 then
      local c = redis.call('HGET', K_CTR, tenant)
      if c then
        local held = num(redis.call('HGET', K_HELD, tenant))
        local in_use = redis.call('ZCARD', K_SEATS)
        local fit = in_use < seats and (cap == 0 or held < cap)
        if fit and headroom > 0 and not (hold > 0 and hold <= short_s)
          and not (held * num(sys[2]) < seats * weight * (1 - 1e-9)) then
          fit = seats - in_use > headroom
        end
        if fit then
          local vt, counter = num(sys[3]), c + 0
          redis.call('ZREM', K_LEFT, tenant)
          if counter > vt then
            redis.call('HSET', K_SYS, 'vt', c)
          else
            counter = vt
          end
          redis.call('HSET', K_CTR, tenant, tostring(counter + cost / weight))
          redis.call('HINCRBY', K_HELD, tenant, '1')
          redis.call('ZADD', K_SEATS, string.format('%d', now + lease_ms), ticket)
          redis.call('HSET', K_LEASE, ticket, tenant)
          return {0, now}
        end
      end
    end
  end
end

-- The pool's other keys (the release above needs none of them).
local K_RESV = base .. ':resv'      -- hash tenant -> reserved seats
local K_RES = base .. ':res'        -- set of tenants with a reservation
local K_QN = base .. ':qn'          -- hash tenant -> queued tickets
local K_W = base .. ':w'            -- hash tenant -> weight counted in aw (active tenants)
local K_TK = base .. ':tk'          -- hash ticket -> tenant|band|cost|weight|cap|tokens|since|hold
local K_TKX = base .. ':tkx'        -- zset ticket -> heartbeat expiry ms (queued)

-- Helpers only a queue needs (queued tickets, bands, dispatch), made on first use by
-- queue_helpers(): a closure costs 1-2 k instructions, and a seat granted at once needs none.
local qkey, blkey, split, floor_counter, unqueue, purge_tickets, purge, waiting_now, take, pick,
  dispatch, queue_helpers

local counter_of -- made after the usual seat request below (grant calls it when not given c)

local function fits(tenant, hold, held, reserving, weight, in_use, aw)
  -- Protected seats: others' unused reserved seats, plus the headroom unless the tenant is
  -- below its seat share; a request within its own reservation, or expected
  -- to end within short_s, may take any free seat. The reserving tenants, the tenant's
  -- weight, the seats in use and the active sum (aw, false: none) may be given when the
  -- caller has just read them.
  reserving = reserving or redis.call('SMEMBERS', K_RES)
  if headroom <= 0 and #reserving == 0 then return true end
  if #reserving > 0 and held < num(redis.call('HGET', K_RESV, tenant)) then return true end
  if hold > 0 and hold <= short_s then return true end
  local protected = 0
  for _, other in ipairs(reserving) do
    if other ~= tenant then
      local unused = num(redis.call('HGET', K_RESV, other)) - num(redis.call('HGET', K_HELD, other))
      if unused > 0 then protected = protected + unused end
    end
  end
  if headroom > 0 then
    if aw == nil then aw = redis.call('HGET', K_SYS, 'aw') end
    aw = num(aw)
    local w = weight or num(redis.call('HGET', K_W, tenant))
    if not (held * aw < seats * w * (1 - 1e-9)) then protected = protected + headroom end
  end
  return seats - (in_use or redis.call('ZCARD', K_SEATS)) > protected
end

local function grant(ticket, tenant, cost, weight, lease_ms, tokens, c, vt, stored)
  -- c, vt: the tenant's counter and the virtual time, when the caller has read them;
  -- stored: c as read (a string), written as it is when it becomes the virtual time.
  if c == nil then c = counter_of(tenant) end
  if vt == nil then vt = num(redis.call('HGET', K_SYS, 'vt')) end
  if c > vt then redis.call('HSET', K_SYS, 'vt', stored or tostring(c)) end
  redis.call('HSET', K_CTR, tenant, tostring(c + cost / weight))
  redis.call('HINCRBY', K_HELD, tenant, '1')
  redis.call('ZADD', K_SEATS, string.format('%d', now + lease_ms), ticket)
  redis.call('HSET', K_LEASE, ticket, tenant)
  if take_tokens then take_tokens(tokens) end
end

counter_of = function(tenant)
  local c = redis.call('HGET', K_CTR, tenant)
  if c then return tonumber(c) end
  queue_helpers()
  local f = floor_counter()
  redis.call('HSET', K_CTR, tenant, tostring(f))
  return f
end

local function activate(tenant, weight)
  -- The tenant holds or waits for a seat: its weight counts in the active sum. Returns the
  -- new sum when it changed it.
  local cw = num(redis.call('HGET', K_W, tenant))
  local aw
  if cw ~= weight then
    aw = redis.call('HINCRBYFLOAT', K_SYS, 'aw', weight - cw)
    redis.call('HSET', K_W, tenant, tostring(weight))
  end
  redis.call('ZREM', K_LEFT, tenant)
  return aw
end

local function maybe_idle(tenant, held, waiting)
  -- Holding and waiting for nothing: the weight leaves after linger_s. ``held`` and the
  -- pool's ``waiting`` may be given when known (nobody waiting: neither does the tenant).
  if held == nil then held = num(redis.call('HGET', K_HELD, tenant)) end
  if held > 0 then return end
  if waiting == 0 or num(redis.call('HGET', K_QN, tenant)) <= 0 then
    redis.call('ZADD', K_LEFT, now, tenant)
  end
end

local function expire()
  -- Returns whether a tenant left (the active sum changed).
  local gone = redis.call('ZRANGEBYSCORE', K_LEFT, '-inf', string.format('%d', now - linger_ms))
  if #gone == 0 then return false end
  for _, name in ipairs(gone) do
    local cw = num(redis.call('HGET', K_W, name))
    redis.call('HINCRBYFLOAT', K_SYS, 'aw', -cw)
    redis.call('HDEL', K_W, name)
    redis.call('ZREM', K_LEFT, name)
  end
  if redis.call('HLEN', K_W) == 0 then
    redis.call('HSET', K_SYS, 'aw', '0') -- no float drift survives an idle pool
  end
  return true
end

local function room()
  -- The optional token bucket: refill to now; a dispatch needs a positive level.
  if rate <= 0 then return true end
  local lvl = redis.call('HGET', K_SYS, 'lvl')
  local lts = num(redis.call('HGET', K_SYS, 'lts'))
  if lvl then lvl = tonumber(lvl) else lvl = burst end
  if lts > 0 and now > lts then lvl = math.min(burst, lvl + (now - lts) * rate / 1000) end
  redis.call('HSET', K_SYS, 'lvl', tostring(lvl), 'lts', now)
  return lvl > 0
end

local function purge_seats()
  for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', K_SEATS, '-inf', string.format('%d', now))) do
    local tenant = redis.call('HGET', K_LEASE, ticket)
    redis.call('HDEL', K_LEASE, ticket)
    redis.call('ZREM', K_SEATS, ticket)
    if tenant then
      redis.call('HINCRBY', K_HELD, tenant, -1)
      maybe_idle(tenant)
    end
  end
end

queue_helpers = function()
  if dispatch then return end
  qkey = function(band, tenant) return base .. ':q:' .. band .. ':' .. tenant end

  blkey = function(band) return base .. ':bl:' .. band end

  split = function(s)
    local out = {}
    for part in string.gmatch(s, '([^|]+)') do out[#out + 1] = part end
    return out
  end

  floor_counter = function()
    -- Where a newly backlogged tenant starts: min counter of the backlogged, else vt.
    local best = nil
    for b = 1, nbands do
      for _, name in ipairs(redis.call('SMEMBERS', blkey(b))) do
        local c = num(redis.call('HGET', K_CTR, name))
        if best == nil or c < best then best = c end
      end
    end
    if best == nil then best = num(redis.call('HGET', K_SYS, 'vt')) end
    return best
  end

  unqueue = function(ticket, tenant, band)
    redis.call('HINCRBY', K_QN, tenant, -1)
    redis.call('HINCRBY', K_SYS, 'w', -1)
    if redis.call('LLEN', qkey(band, tenant)) == 0 then
      redis.call('SREM', blkey(band), tenant)
    end
    redis.call('HDEL', K_TK, ticket)
    redis.call('ZREM', K_TKX, ticket)
  end

  purge_tickets = function()
    for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', K_TKX, '-inf', now)) do
      local info = redis.call('HGET', K_TK, ticket)
      if info then
        local f = split(info)
        redis.call('LREM', qkey(f[2], f[1]), 1, ticket)
        unqueue(ticket, f[1], f[2])
        maybe_idle(f[1])
      else
        redis.call('ZREM', K_TKX, ticket)
      end
    end
  end

  purge = function()
    purge_seats()
    purge_tickets()
  end

  waiting_now = function()
    -- Queued tickets in the pool (each has a heartbeat entry: none queued, none to purge).
    return num(redis.call('HGET', K_SYS, 'w'))
  end

  take = function(tenant, band, charge_band, lease_ms)
    local ticket = redis.call('LPOP', qkey(band, tenant))
    local f = split(redis.call('HGET', K_TK, ticket))
    unqueue(ticket, tenant, band)
    if charge_band then
      local field = 'b' .. band
      local bc = num(redis.call('HGET', K_SYS, field))
      local bvt = num(redis.call('HGET', K_SYS, 'bvt'))
      if bc > bvt then redis.call('HSET', K_SYS, 'bvt', tostring(bc)) end
      redis.call('HSET', K_SYS, field, tostring(bc + steps[band]))
    end
    grant(ticket, tenant, tonumber(f[3]), tonumber(f[4]), lease_ms, tonumber(f[6]))
    return ticket
  end

  pick = function(lease_ms)
    -- Guaranteed seats first.
    local best, best_c = nil, 0
    for _, name in ipairs(redis.call('SMEMBERS', K_RES)) do
      if num(redis.call('HGET', K_QN, name)) > 0
        and num(redis.call('HGET', K_HELD, name)) < num(redis.call('HGET', K_RESV, name)) then
        local c = num(redis.call('HGET', K_CTR, name))
        if best == nil or c < best_c then best, best_c = name, c end
      end
    end
    if best ~= nil then
      for b = 1, nbands do
        if redis.call('LLEN', qkey(b, best)) > 0 then return take(best, b, false, lease_ms) end
      end
    end
    -- Then bands by counter, tenants inside a band by counter.
    local order = {}
    for b = 1, nbands do
      if redis.call('SCARD', blkey(b)) > 0 then
        order[#order + 1] = {num(redis.call('HGET', K_SYS, 'b' .. b)), b}
      end
    end
    table.sort(order, function(x, y) return x[1] < y[1] or (x[1] == y[1] and x[2] < y[2]) end)
    for _, entry in ipairs(order) do
      local b = entry[2]
      best = nil
      for _, name in ipairs(redis.call('SMEMBERS', blkey(b))) do
        local head = redis.call('LINDEX', qkey(b, name), 0)
        local cap, hold = 0, 0
        if head then
          local info = redis.call('HGET', K_TK, head)
          if info then
            local f = split(info)
            cap, hold = tonumber(f[5]), tonumber(f[8]) or 0
          end
        end
        local held = num(redis.call('HGET', K_HELD, name))
        if (cap == 0 or held < cap) and fits(name, hold, held) then
          local c = num(redis.call('HGET', K_CTR, name))
          if best == nil or c < best_c then best, best_c = name, c end
        end
      end
      if best ~= nil then return take(best, b, true, lease_ms) end
    end
    return nil
  end

  dispatch = function(lease_ms)
    local granted = {}
    while num(redis.call('HGET', K_SYS, 'w')) > 0 and redis.call('ZCARD', K_SEATS) < seats
      and room() do
      local ticket = pick(lease_ms)
      if ticket == nil then break end
      granted[#granted + 1] = ticket
    end
    return granted
  end
end

if op == 'acquire' then
  -- ticket, tenant, band, cost, weight, reserved, cap, max_queue, lease_ms, heartbeat_ms,
  -- tokens, hold (expected seconds, 0: unknown), deadline (Redis ms, 0: none).
  -- Reply: {status, now, granted tickets...}; status 4: past the deadline (the caller has
  -- given up, tenantware/backends/redis_clock.py), nothing done.
  local ticket, tenant, band, cost, weight, reserved, cap, max_queue, lease_ms, hb_ms, tokens,
    hold, deadline = cmsgpack.unpack(ARGV[3])
  if deadline > 0 and now > deadline then return {4, now} end
  purge_seats()
  local sys = redis.call('HMGET', K_SYS, 'w', 'aw', 'vt')
  local waiting, aw, vt = num(sys[1]), sys[2], num(sys[3])
  if waiting > 0 then
    queue_helpers()
    purge_tickets()
    waiting = waiting_now()
  end
  if expire() then aw = nil end
  aw = activate(tenant, weight) or aw
  local reserving = redis.call('SMEMBERS', K_RES)
  if reserved > 0 then
    redis.call('HSET', K_RESV, tenant, reserved)
    if redis.call('SADD', K_RES, tenant) == 1 then reserving[#reserving + 1] = tenant end
  else
    for i, name in ipairs(reserving) do
      if name == tenant then
        redis.call('SREM', K_RES, tenant)
        redis.call('HDEL', K_RESV, tenant)
        table.remove(reserving, i)
        break
      end
    end
  end
  local held = num(redis.call('HGET', K_HELD, tenant))
  local in_use = 0
  if waiting == 0 then in_use = redis.call('ZCARD', K_SEATS) end
  if waiting == 0 and in_use < seats and (cap == 0 or held < cap)
    and fits(tenant, hold, held, reserving, weight, in_use, aw) and room() then
    local c = counter_of(tenant)
    if c < vt then c = vt end
    grant(ticket, tenant, cost, weight, lease_ms, tokens, c, vt)
    return {0, now}
  end
  queue_helpers()
  local queued = num(redis.call('HGET', K_QN, tenant))
  if queued >= max_queue then return {2, now} end
  if queued == 0 then
    local c = counter_of(tenant)
    local f = floor_counter()
    if c < f then redis.call('HSET', K_CTR, tenant, tostring(f)) end
  end
  if redis.call('SCARD', blkey(band)) == 0 then
    local low = nil
    for b = 1, nbands do
      if redis.call('SCARD', blkey(b)) > 0 then
        local bc = num(redis.call('HGET', K_SYS, 'b' .. b))
        if low == nil or bc < low then low = bc end
      end
    end
    if low == nil then low = num(redis.call('HGET', K_SYS, 'bvt')) end
    if num(redis.call('HGET', K_SYS, 'b' .. band)) < low then
      redis.call('HSET', K_SYS, 'b' .. band, tostring(low))
    end
  end
  redis.call('SADD', blkey(band), tenant)
  redis.call('RPUSH', qkey(band, tenant), ticket)
  redis.call('HSET', K_TK, ticket,
    table.concat({tenant, band, cost, weight, cap, tokens, now, hold}, '|'))
  redis.call('ZADD', K_TKX, now + hb_ms, ticket)
  redis.call('HINCRBY', K_QN, tenant, 1)
  redis.call('HINCRBY', K_SYS, 'w', 1)
  local granted = dispatch(lease_ms)
  local status = 1
  if redis.call('ZSCORE', K_SEATS, ticket) then status = 0 end
  return {status, now, unpack(granted)}
elseif op == 'poll' then
  -- ticket, lease_ms, heartbeat_ms: 0 granted, 1 still queued, 3 unknown (expired)
  local ticket, lease_ms, hb_ms = cmsgpack.unpack(ARGV[3])
  queue_helpers()
  purge()
  expire()
  local granted = dispatch(lease_ms)
  if redis.call('ZSCORE', K_SEATS, ticket) then return {0, unpack(granted)} end
  if redis.call('HEXISTS', K_TK, ticket) == 1 then
    redis.call('ZADD', K_TKX, now + hb_ms, ticket)
    return {1, unpack(granted)}
  end
  return {3, unpack(granted)}
elseif op == 'release' then
  -- Someone waits (the seat, if any, was freed above): sweep, dispatch.
  local ticket, tenant, band, _, _, _, lease_ms = cmsgpack.unpack(ARGV[3])
  queue_helpers()
  purge()
  if released then
    maybe_idle(tenant, released_held, waiting)
  elseif redis.call('HEXISTS', K_TK, ticket) == 1 then
    -- Still queued (a cancel): leave the queue, nothing charged.
    redis.call('LREM', qkey(band, tenant), 1, ticket)
    unqueue(ticket, tenant, band)
    maybe_idle(tenant)
  end
  expire()
  return dispatch(lease_ms)
elseif op == 'charge' then
  -- ticket, tenant, weight, extra: a long stream is charged as it goes (lease still held)
  local ticket, tenant, weight, extra = cmsgpack.unpack(ARGV[3])
  if extra > 0 and redis.call('ZSCORE', K_SEATS, ticket) then
    local c = num(redis.call('HGET', K_CTR, tenant))
    redis.call('HSET', K_CTR, tenant, tostring(c + extra / weight))
  end
  return {}
elseif op == 'renew' then
  -- lease_ms, then the tickets as ARGV[4...]: push the expiry of leases still held
  local lease_ms = cmsgpack.unpack(ARGV[3])
  for i = 4, #ARGV do redis.call('ZADD', K_SEATS, 'XX', now + lease_ms, ARGV[i]) end
  return {}
elseif op == 'state' then
  -- seats in use, waiting, then per tenant: name, counter, held, queued, oldest wait (ms)
  queue_helpers()
  purge()
  local oldest = {}
  local tk = redis.call('HGETALL', K_TK)
  for i = 2, #tk, 2 do
    local f = split(tk[i])
    local since = tonumber(f[7])
    if oldest[f[1]] == nil or since < oldest[f[1]] then oldest[f[1]] = since end
  end
  local out = {redis.call('ZCARD', K_SEATS), num(redis.call('HGET', K_SYS, 'w'))}
  local ctr = redis.call('HGETALL', K_CTR)
  for i = 1, #ctr, 2 do
    local name = ctr[i]
    out[#out + 1] = name
    out[#out + 1] = ctr[i + 1]
    out[#out + 1] = num(redis.call('HGET', K_HELD, name))
    out[#out + 1] = num(redis.call('HGET', K_QN, name))
    if oldest[name] then out[#out + 1] = now - oldest[name] else out[#out + 1] = 0 end
  end
  return out
end
return redis.error_reply('unknown op ' .. tostring(op))
