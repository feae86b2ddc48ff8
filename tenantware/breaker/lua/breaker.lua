-- One decision on one circuit (the Lua twin of tenantware/breaker/circuit.py).
-- KEYS[1]: the circuit's hash. ARGV: now_ms ('' = Redis TIME), ok, slow, fail, trailing_fail,
-- mode (0 outcomes only, 1 probe ok, 2 probe failed, 3 probe slot given back, 4 take a probe),
-- cool_ms, then the policy: consecutive, rate %, slow rate %, minimum calls, bucket ms,
-- buckets, wait ms, max wait ms, probes, key ttl ms; then the calling process's id, and
-- how many of the failures were timeouts (slow as well, for the slow-call rate).
-- Consecutive failures are counted per process (field 'p.<id>': that process's failures since
-- its own last success); the circuit opens when they add up to the threshold ('cf' is the sum),
-- so one process's successes never hide another's failures.
-- Returns {old state, new state, ms until the open period ends, ms of cooling left,
-- probes left, probe granted}.
local key = KEYS[1]
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local ok = tonumber(ARGV[2])
local slow = tonumber(ARGV[3])
local fail = tonumber(ARGV[4])
local trailing = tonumber(ARGV[5])
local mode = tonumber(ARGV[6])
local cool_ms = tonumber(ARGV[7])
local max_consec = tonumber(ARGV[8])
local rate = tonumber(ARGV[9])
local slow_rate = tonumber(ARGV[10])
local min_calls = tonumber(ARGV[11])
local bucket_ms = tonumber(ARGV[12])
local n = tonumber(ARGV[13])
local wait_ms = tonumber(ARGV[14])
local max_wait_ms = tonumber(ARGV[15])
local probes = tonumber(ARGV[16])
local ttl_ms = tonumber(ARGV[17])
local own = 'p.' .. ARGV[18]
local slow_fail = tonumber(ARGV[19]) or 0

local raw = redis.call('HGETALL', key)
local h = {}
for i = 1, #raw, 2 do h[raw[i]] = tonumber(raw[i + 1]) end
local function get(f) return h[f] or 0 end
local st = get('st')
local old = st

local function wait_for(trips)
  local wait = wait_ms * 2 ^ math.min(trips - 1, 30)
  if wait > max_wait_ms then wait = max_wait_ms end
  return wait
end

local function clear_window()
  for i = 0, n - 1 do
    h['c' .. i] = 0
    h['f' .. i] = 0
    h['s' .. i] = 0
  end
  h.tc = 0
  h.tf = 0
  h.ts = 0
end

-- Fields to delete at the end (HSET below writes only the fields left in h).
local gone = {}
local function drop(f)
  if h[f] ~= nil then
    h[f] = nil
    gone[#gone + 1] = f
  end
end

local function reset_consecutive()
  local runs = {}
  for f, _ in pairs(h) do
    if string.sub(f, 1, 2) == 'p.' then runs[#runs + 1] = f end
  end
  for _, f in ipairs(runs) do drop(f) end
  h.cf = 0
end

local function open()
  if st == 0 and now - get('ca') > max_wait_ms then h.tr = 0 end
  local trips = get('tr') + 1
  h.tr = trips
  st = 2
  h.ou = now + wait_for(trips)
  reset_consecutive()
  h.pl = 0
  clear_window()
end

local function close()
  st = 0
  h.ca = now
  reset_consecutive()
  clear_window()
end

-- Probes unanswered for a whole open period (their process died): probe afresh.
if st == 1 and get('pl') <= 0 and now - get('ho') >= wait_for(get('tr')) then
  h.pl = probes
  h.po = 0
  h.ho = now
end
if cool_ms > 0 and now + cool_ms > get('cu') then h.cu = now + cool_ms end
local granted = 0
if mode == 4 then
  if st == 2 and now >= get('ou') then
    st = 1
    h.pl = probes
    h.po = 0
    h.ho = now
  end
  if st == 1 and get('pl') > 0 and now >= get('cu') then
    h.pl = get('pl') - 1
    granted = 1
  end
elseif mode > 0 and st == 1 then
  if mode == 2 then
    open()
  elseif mode == 3 then
    h.pl = get('pl') + 1
  else
    h.po = get('po') + 1
    if h.po >= probes then close() end
  end
else
  -- A probe answer after the circuit left HALF_OPEN counts like any other call.
  if mode == 1 then
    ok = ok + 1
    trailing = 0
  elseif mode == 2 then
    fail = fail + 1
    trailing = trailing + 1
  end
  local calls = ok + slow + fail
  if st == 0 and calls > 0 then
    local b = math.floor(now / bucket_ms)
    local last = get('lb')
    if b ~= last then
      if b - last >= n or b < last then
        clear_window()
      else
        for i = last + 1, b do
          local j = i % n
          h.tc = get('tc') - get('c' .. j)
          h.tf = get('tf') - get('f' .. j)
          h.ts = get('ts') - get('s' .. j)
          h['c' .. j] = 0
          h['f' .. j] = 0
          h['s' .. j] = 0
        end
      end
      h.lb = b
    end
    local j = b % n
    h['c' .. j] = get('c' .. j) + calls
    h['f' .. j] = get('f' .. j) + fail
    h['s' .. j] = get('s' .. j) + slow + slow_fail
    h.tc = get('tc') + calls
    h.tf = get('tf') + fail
    h.ts = get('ts') + slow + slow_fail
    -- This process's run of failures: reset only by its own successes.
    if ok + slow > 0 then h[own] = trailing else h[own] = get(own) + fail end
    local run = h[own]
    if run == 0 then drop(own) end
    local sum = 0
    for f, v in pairs(h) do
      if string.sub(f, 1, 2) == 'p.' then sum = sum + v end
    end
    h.cf = sum
    local tc = h.tc
    if h.cf >= max_consec
      or (tc >= min_calls and (h.tf * 100 >= rate * tc or h.ts * 100 >= slow_rate * tc)) then
      open()
    end
  end
end
h.st = st
local flat = {}
for f, v in pairs(h) do
  flat[#flat + 1] = f
  flat[#flat + 1] = string.format('%d', v)
end
if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
redis.call('HSET', key, unpack(flat))
redis.call('PEXPIRE', key, ttl_ms)
local open_rem = 0
if st == 2 and get('ou') > now then open_rem = get('ou') - now end
local cool_rem = 0
if get('cu') > now then cool_rem = get('cu') - now end
return {old, st, open_rem, cool_rem, get('pl'), granted}
