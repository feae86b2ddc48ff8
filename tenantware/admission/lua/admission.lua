-- Fair-share admission of one seat pool: the rules of tenantware/admission/core.py in Redis.
-- One script, one decision per call (ARGV[1] = op). Every key of the pool shares the hash tag
-- of KEYS[1] (the pool, not a tenant: a decision compares all tenants of the pool), so the
-- per-tenant queue keys built below live in the same slot and the script runs on a cluster.
-- Time comes from Redis TIME (ms). Seats are leases with an expiry: a dead process's seats
-- come back by themselves; queued tickets carry a heartbeat the waiting process refreshes.
--
-- ARGV: op, seats, rate (tokens/s, 0: none), burst (tokens), nbands, share_1..share_n,
-- headroom (seats), short_s, linger_s, then the op's own arguments.
--
-- The pool's counters (system and per tenant) are fields of one hash, K_P: a call reads the
-- fields it needs with one HMGET up front (get() reads any other field once), works on its
-- copy, and writes what changed with one HSET (and one HDEL) at the end (flush()). The keys
-- are those of layout 2 (":2:" after the pool's name): a process still running the earlier
-- layout keeps its own books under the old names until it is restarted.

local base = KEYS[1] .. ':2'
local K_P = base .. ':p'            -- hash: vt, bvt, w (waiting), b1..bn, lvl/lts (bucket),
                                    -- aw (weight sum of the active tenants), nw (tenants in
                                    -- aw), nr (tenants with a reservation), n (seats in
                                    -- use), se (no seat expires before: ms), ld (no tenant
                                    -- went idle before: ms); per tenant t:
                                    -- c:t virtual counter, h:t seats held, q:t queued tickets,
                                    -- r:t reserved seats, w:t weight counted in aw; per
                                    -- granted ticket k: l:k its tenant
local K_SEATS = base .. ':seats'    -- zset lease(ticket id) -> expiry ms
local K_RES = base .. ':res'        -- set of tenants with a reservation
local K_LEFT = base .. ':left'      -- zset tenant -> ms it went idle (lingering, still active)
local K_TK = base .. ':tk'          -- hash ticket -> tenant|band|cost|weight|cap|tokens|since|hold
local K_TKX = base .. ':tkx'        -- zset ticket -> heartbeat expiry ms (queued)

local op = ARGV[1]
local seats = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local nbands = tonumber(ARGV[5])
local steps = {}
for b = 1, nbands do steps[b] = 1 / tonumber(ARGV[5 + b]) end
local headroom = tonumber(ARGV[6 + nbands])
local short_s = tonumber(ARGV[7 + nbands])
local linger_ms = tonumber(ARGV[8 + nbands]) * 1000
local a = 9 + nbands -- first op argument
if headroom > seats - 1 then headroom = seats - 1 end -- one seat stays open to everyone

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function num(v) return tonumber(v) or 0 end
local function qkey(band, tenant) return base .. ':q:' .. band .. ':' .. tenant end
local function blkey(band) return base .. ':bl:' .. band end

-- This call's copy of K_P: field -> value (false: absent); changed fields are flushed.
local cache, dirty = {}, {}

local function load(names)
  local missing = {}
  for _, f in ipairs(names) do
    if cache[f] == nil then missing[#missing + 1] = f end
  end
  if #missing > 0 then
    local values = redis.call('HMGET', K_P, unpack(missing))
    for i, f in ipairs(missing) do cache[f] = values[i] end
  end
end

local function get(f)
  local v = cache[f]
  if v == nil then
    v = redis.call('HGET', K_P, f)
    cache[f] = v
  end
  return v
end

-- Values are kept as Redis would return them (a number as tostring() writes it).
local function set(f, v)
  if type(v) == 'number' then v = tostring(v) end
  cache[f] = v
  dirty[f] = true
end

local function del(f)
  cache[f] = false
  dirty[f] = true
end

local function incr(f, by) set(f, num(get(f)) + by) end

local function flush()
  local sets, dels = {}, {}
  for f in pairs(dirty) do
    local v = cache[f]
    if v then
      sets[#sets + 1] = f
      sets[#sets + 1] = v
    else
      dels[#dels + 1] = f
    end
  end
  if #sets > 0 then redis.call('HSET', K_P, unpack(sets)) end
  if #dels > 0 then redis.call('HDEL', K_P, unpack(dels)) end
end

-- Seats in use: field n, counted by every ZADD and ZREM of K_SEATS below (their replies).
local function in_use() return num(get('n')) end

-- The earliest time (ms) recorded in a sorted set may be later than the bound kept in K_P
-- (a renewal or a new entry moved it), never earlier: a scan for expired entries runs only
-- once the bound has passed, and leaves the set's true earliest time as the next bound.
local function lower_bound(f, at)
  local bound = get(f)
  if not bound or at < tonumber(bound) then set(f, at) end
end

local function rebound(f, key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then set(f, first[2]) else del(f) end
end

local function split(s)
  local out = {}
  for part in string.gmatch(s, '([^|]+)') do out[#out + 1] = part end
  return out
end

local function floor_counter()
  -- Where a newly backlogged tenant starts: min counter of the backlogged, else vt. Nothing
  -- waits (w = 0): every backlog set is empty.
  local best = nil
  if num(get('w')) > 0 then
    for b = 1, nbands do
      for _, name in ipairs(redis.call('SMEMBERS', blkey(b))) do
        local c = num(get('c:' .. name))
        if best == nil or c < best then best = c end
      end
    end
  end
  if best == nil then best = num(get('vt')) end
  return best
end

local function counter_of(tenant)
  local c = get('c:' .. tenant)
  if c then return tonumber(c) end
  local f = floor_counter()
  set('c:' .. tenant, tostring(f))
  return f
end

local function activate(tenant, weight)
  -- The tenant holds or waits for a seat: its weight counts in the active sum. A tenant
  -- that holds or waits for something is not lingering (maybe_idle adds only idle ones).
  local was = get('w:' .. tenant)
  local cw = num(was)
  if cw ~= weight then
    set('aw', string.format('%.17g', num(get('aw')) + weight - cw))
    set('w:' .. tenant, tostring(weight))
    if not was then incr('nw', 1) end
  end
  if num(get('h:' .. tenant)) <= 0 and num(get('q:' .. tenant)) <= 0 then
    redis.call('ZREM', K_LEFT, tenant)
  end
end

local function maybe_idle(tenant)
  -- Holding and waiting for nothing: the weight leaves after linger_s.
  if num(get('h:' .. tenant)) <= 0 and num(get('q:' .. tenant)) <= 0 then
    redis.call('ZADD', K_LEFT, now, tenant)
    lower_bound('ld', now)
  end
end

local function expire()
  -- Nobody can have lingered linger_s yet while the earliest idle time (ld) is recent.
  local ld = get('ld')
  if ld and tonumber(ld) <= now - linger_ms then
    for _, name in ipairs(redis.call('ZRANGEBYSCORE', K_LEFT, '-inf', now - linger_ms)) do
      local cw = num(get('w:' .. name))
      set('aw', string.format('%.17g', num(get('aw')) - cw))
      if get('w:' .. name) then
        del('w:' .. name)
        incr('nw', -1)
      end
      redis.call('ZREM', K_LEFT, name)
    end
    rebound('ld', K_LEFT)
  end
  if num(get('nw')) <= 0 and get('aw') ~= '0' then
    set('aw', '0') -- no float drift survives an idle pool
  end
end

local function reserving()
  if num(get('nr')) <= 0 then return {} end
  return redis.call('SMEMBERS', K_RES)
end

local function fits(tenant, hold, held)
  -- Protected seats: others' unused reserved seats, plus the headroom unless the tenant is
  -- below its seat share; a request within its own reservation, or expected
  -- to end within short_s, may take any free seat.
  local others = reserving()
  if headroom <= 0 and #others == 0 then return true end
  if held < num(get('r:' .. tenant)) then return true end
  if hold > 0 and hold <= short_s then return true end
  local protected = 0
  for _, other in ipairs(others) do
    if other ~= tenant then
      local unused = num(get('r:' .. other)) - num(get('h:' .. other))
      if unused > 0 then protected = protected + unused end
    end
  end
  if headroom > 0 then
    local aw = num(get('aw'))
    local w = num(get('w:' .. tenant))
    if not (held * aw < seats * w * (1 - 1e-9)) then protected = protected + headroom end
  end
  return seats - in_use() > protected
end

local function room()
  -- The optional token bucket: refill to now; a dispatch needs a positive level.
  if rate <= 0 then return true end
  local lvl = get('lvl')
  local lts = num(get('lts'))
  if lvl then lvl = tonumber(lvl) else lvl = burst end
  if lts > 0 and now > lts then lvl = math.min(burst, lvl + (now - lts) * rate / 1000) end
  set('lvl', tostring(lvl))
  set('lts', now)
  return lvl > 0
end

local function take_tokens(tokens)
  if rate > 0 and tokens ~= 0 then
    local lvl = get('lvl')
    if lvl then lvl = tonumber(lvl) else lvl = burst end
    set('lvl', tostring(math.min(burst, lvl - tokens)))
  end
end

local function grant(ticket, tenant, cost, weight, lease_ms, tokens)
  local c = counter_of(tenant)
  local vt = num(get('vt'))
  if c > vt then set('vt', tostring(c)) end
  set('c:' .. tenant, tostring(c + cost / weight))
  incr('h:' .. tenant, 1)
  incr('n', redis.call('ZADD', K_SEATS, now + lease_ms, ticket))
  lower_bound('se', now + lease_ms)
  set('l:' .. ticket, tenant)
  take_tokens(tokens)
end

local function unqueue(ticket, tenant, band)
  incr('q:' .. tenant, -1)
  incr('w', -1)
  if redis.call('LLEN', qkey(band, tenant)) == 0 then
    redis.call('SREM', blkey(band), tenant)
  end
  redis.call('HDEL', K_TK, ticket)
  redis.call('ZREM', K_TKX, ticket)
end

local function purge()
  local se = get('se')
  if se and tonumber(se) <= now then
    for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', K_SEATS, '-inf', now)) do
      local tenant = get('l:' .. ticket)
      del('l:' .. ticket)
      incr('n', -redis.call('ZREM', K_SEATS, ticket))
      if tenant then
        incr('h:' .. tenant, -1)
        maybe_idle(tenant)
      end
    end
    rebound('se', K_SEATS)
  end
  -- Queued tickets only exist while something waits (w counts them).
  if num(get('w')) <= 0 then return end
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

local function take(tenant, band, charge_band, lease_ms)
  local ticket = redis.call('LPOP', qkey(band, tenant))
  local f = split(redis.call('HGET', K_TK, ticket))
  unqueue(ticket, tenant, band)
  if charge_band then
    local field = 'b' .. band
    local bc = num(get(field))
    local bvt = num(get('bvt'))
    if bc > bvt then set('bvt', tostring(bc)) end
    set(field, tostring(bc + steps[band]))
  end
  grant(ticket, tenant, tonumber(f[3]), tonumber(f[4]), lease_ms, tonumber(f[6]))
  return ticket
end

local function pick(lease_ms)
  -- Guaranteed seats first.
  local best, best_c = nil, 0
  for _, name in ipairs(reserving()) do
    if num(get('q:' .. name)) > 0
      and num(get('h:' .. name)) < num(get('r:' .. name)) then
      local c = num(get('c:' .. name))
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
      order[#order + 1] = {num(get('b' .. b)), b}
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
      local held = num(get('h:' .. name))
      if (cap == 0 or held < cap) and fits(name, hold, held) then
        local c = num(get('c:' .. name))
        if best == nil or c < best_c then best, best_c = name, c end
      end
    end
    if best ~= nil then return take(best, b, true, lease_ms) end
  end
  return nil
end

local function dispatch(lease_ms)
  local granted = {}
  while num(get('w')) > 0 and in_use() < seats and room() do
    local ticket = pick(lease_ms)
    if ticket == nil then break end
    granted[#granted + 1] = ticket
  end
  return granted
end

local function acquire()
  -- ticket, tenant, band, cost, weight, reserved, cap, max_queue, lease_ms, heartbeat_ms,
  -- tokens, hold (expected seconds, 0: unknown), deadline (Redis ms, 0: none).
  -- Reply: {status, now, granted tickets...}; status 4: past the deadline (the caller has
  -- given up, tenantware/backends/redis_clock.py), nothing done.
  local ticket, tenant, band = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local cost, weight = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local reserved, cap = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local max_queue, lease_ms, hb_ms = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  local tokens, hold = tonumber(ARGV[a + 10]), tonumber(ARGV[a + 11])
  local deadline = tonumber(ARGV[a + 12]) or 0
  if deadline > 0 and now > deadline then return {4, now} end
  load({'w', 'vt', 'aw', 'nw', 'nr', 'n', 'se', 'ld', 'c:' .. tenant, 'h:' .. tenant,
    'q:' .. tenant, 'r:' .. tenant, 'w:' .. tenant})
  purge()
  expire()
  activate(tenant, weight)
  -- A tenant has a reservation (r:t) exactly while it is a member of K_RES.
  if reserved > 0 then
    if not get('r:' .. tenant) then
      redis.call('SADD', K_RES, tenant)
      incr('nr', 1)
    end
    set('r:' .. tenant, reserved)
  elseif get('r:' .. tenant) then
    redis.call('SREM', K_RES, tenant)
    del('r:' .. tenant)
    incr('nr', -1)
  end
  local held = num(get('h:' .. tenant))
  local waiting = num(get('w'))
  if waiting == 0 and in_use() < seats and (cap == 0 or held < cap)
    and fits(tenant, hold, held) and room() then
    local c = counter_of(tenant)
    local vt = num(get('vt'))
    if c < vt then set('c:' .. tenant, tostring(vt)) end
    grant(ticket, tenant, cost, weight, lease_ms, tokens)
    return {0, now}
  end
  local queued = num(get('q:' .. tenant))
  if queued >= max_queue then return {2, now} end
  if queued == 0 then
    local c = counter_of(tenant)
    local f = floor_counter()
    if c < f then set('c:' .. tenant, tostring(f)) end
  end
  if redis.call('SCARD', blkey(band)) == 0 then
    local low = nil
    for b = 1, nbands do
      if redis.call('SCARD', blkey(b)) > 0 then
        local bc = num(get('b' .. b))
        if low == nil or bc < low then low = bc end
      end
    end
    if low == nil then low = num(get('bvt')) end
    if num(get('b' .. band)) < low then
      set('b' .. band, tostring(low))
    end
  end
  redis.call('SADD', blkey(band), tenant)
  redis.call('RPUSH', qkey(band, tenant), ticket)
  redis.call('HSET', K_TK, ticket,
    table.concat({tenant, band, cost, weight, cap, tokens, now, hold}, '|'))
  redis.call('ZADD', K_TKX, now + hb_ms, ticket)
  incr('q:' .. tenant, 1)
  incr('w', 1)
  local granted = dispatch(lease_ms)
  local status = 1
  if redis.call('ZSCORE', K_SEATS, ticket) then status = 0 end
  return {status, now, unpack(granted)}
end

local function poll()
  -- ticket, lease_ms, heartbeat_ms: 0 granted, 1 still queued, 3 unknown (expired)
  local ticket, lease_ms, hb_ms = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  load({'w', 'vt', 'bvt', 'aw', 'nw', 'nr', 'n', 'se', 'ld'})
  purge()
  expire()
  local granted = dispatch(lease_ms)
  if redis.call('ZSCORE', K_SEATS, ticket) then return {0, unpack(granted)} end
  if redis.call('HEXISTS', K_TK, ticket) == 1 then
    redis.call('ZADD', K_TKX, now + hb_ms, ticket)
    return {1, unpack(granted)}
  end
  return {3, unpack(granted)}
end

local function release()
  -- ticket, tenant, band, cost, weight, actual_cost, lease_ms, tokens, actual_tokens
  local ticket, tenant, band = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local cost, weight, actual = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local lease_ms = tonumber(ARGV[a + 6])
  local tokens, actual_tokens = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  load({'w', 'aw', 'nw', 'n', 'se', 'ld', 'c:' .. tenant, 'h:' .. tenant, 'q:' .. tenant})
  purge()
  if redis.call('ZREM', K_SEATS, ticket) == 1 then
    incr('n', -1)
    incr('h:' .. tenant, -1)
    del('l:' .. ticket)
    local c = num(get('c:' .. tenant))
    set('c:' .. tenant, tostring(c + (actual - cost) / weight))
    take_tokens(actual_tokens - tokens)
    maybe_idle(tenant)
  elseif redis.call('HEXISTS', K_TK, ticket) == 1 then
    -- Still queued (a cancel): leave the queue, nothing charged.
    redis.call('LREM', qkey(band, tenant), 1, ticket)
    unqueue(ticket, tenant, band)
    maybe_idle(tenant)
  end
  expire()
  return dispatch(lease_ms)
end

local function charge()
  -- ticket, tenant, weight, extra: a long stream is charged as it goes (lease still held)
  local ticket, tenant, weight, extra = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if extra > 0 and redis.call('ZSCORE', K_SEATS, ticket) then
    local c = num(get('c:' .. tenant))
    set('c:' .. tenant, tostring(c + extra / weight))
  end
  return {}
end

local function renew()
  -- lease_ms, tickets...: push the expiry of leases still held
  local lease_ms = tonumber(ARGV[a])
  local pairs_ = {}
  for i = a + 1, #ARGV do
    pairs_[#pairs_ + 1] = now + lease_ms
    pairs_[#pairs_ + 1] = ARGV[i]
  end
  if #pairs_ > 0 then redis.call('ZADD', K_SEATS, 'XX', unpack(pairs_)) end
  return {}
end

local function state()
  -- seats in use, waiting, then per tenant: name, counter, held, queued, oldest wait (ms)
  purge()
  local oldest = {}
  local tk = redis.call('HGETALL', K_TK)
  for i = 2, #tk, 2 do
    local f = split(tk[i])
    local since = tonumber(f[7])
    if oldest[f[1]] == nil or since < oldest[f[1]] then oldest[f[1]] = since end
  end
  flush() -- the purge's changes, so the hash read below has them
  dirty = {}
  local out = {redis.call('ZCARD', K_SEATS), num(get('w'))}
  local all = redis.call('HGETALL', K_P)
  for i = 1, #all, 2 do
    cache[all[i]] = all[i + 1]
  end
  for i = 1, #all, 2 do
    local field = all[i]
    if string.sub(field, 1, 2) == 'c:' then
      local name = string.sub(field, 3)
      out[#out + 1] = name
      out[#out + 1] = all[i + 1]
      out[#out + 1] = num(cache['h:' .. name])
      out[#out + 1] = num(cache['q:' .. name])
      if oldest[name] then out[#out + 1] = now - oldest[name] else out[#out + 1] = 0 end
    end
  end
  return out
end

local ops = {
  acquire = acquire, poll = poll, release = release, charge = charge, renew = renew,
  state = state,
}
local run = ops[op]
if run == nil then return redis.error_reply('unknown op ' .. tostring(op)) end
local reply = run()
flush()
return reply
