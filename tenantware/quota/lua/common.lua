-- Shared by reserve.lua and settle.lua (concatenated in front of each when loaded).
local DAY = 86400000000

-- Integers are written as "%.0f": tostring() would round them to 14 digits.
local function int(x)
  return string.format('%.0f', x)
end

-- Months since 1970-01 (UTC) of a time in microseconds (days-to-civil arithmetic).
local function month_index(now)
  local z = math.floor(now / DAY) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local year = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local month
  if mp < 10 then month = mp + 3 else month = mp - 9 end
  if month <= 2 then year = year + 1 end
  return year * 12 + month - 1
end

local function window_of(kind, p1, now)
  if kind == 'm' then return month_index(now) end
  return math.floor(now / p1)
end

-- Counters live as fields of one hash per hash tag (tenantware/quota/plan.py): a script
-- collects the fields it needs per key with want(), reads each hash once with fetch() and
-- writes each once with put() and store(). A rate limit's field holds its theoretical
-- arrival time (µs); a window limit's field f holds its window id and f .. '+' what the
-- window used. Field 'x' of a hash is the time (ms) it expires: read with the others, it
-- tells store() whether the hash needs a longer expiry without a PTTL, so the expiry is set
-- about once per window, not at every decision. Numbers go to redis.call as numbers (Redis
-- writes integers exactly); conversions in Lua cost more here than the commands.

-- Ask for field f of KEYS[k]; returns its position in fetch()'s reply for that key.
local function want(fields, order, k, f)
  local list = fields[k]
  if not list then
    list = {'x'}
    fields[k] = list
    order[#order + 1] = k
  end
  list[#list + 1] = f
  return #list
end

-- One HMGET per hash: key index -> values (false where a field is absent; [1] is 'x').
local function fetch(fields, order)
  local got = {}
  for j = 1, #order do
    local k = order[j]
    got[k] = redis.call('HMGET', KEYS[k], unpack(fields[k]))
  end
  return got
end

-- Stage field f = v of KEYS[k], whose hash must live at least need ms from now; when it
-- must be extended, it is given keep ms (the longest this limit can need: its window).
local function put(writes, order, k, f, v, need, keep)
  local list = writes[k]
  if not list then
    list = {0, 0}
    writes[k] = list
    order[#order + 1] = k
  end
  list[#list + 1] = f
  list[#list + 1] = v
  if need > list[1] then list[1] = need end
  if keep > list[2] then list[2] = keep end
end

-- One HSET per hash (state: fetch()'s reply, now_ms: Redis time); its expiry only ever grows
-- (other plans' fields in the same hash may need it longer).
local function store(writes, order, state, now_ms)
  for j = 1, #order do
    local k = order[j]
    local list = writes[k]
    local extend = (tonumber(state[k][1]) or 0) < now_ms + list[1]
    if extend then
      list[#list + 1] = 'x'
      list[#list + 1] = now_ms + list[2]
    end
    redis.call('HSET', KEYS[k], unpack(list, 3))
    if extend then redis.call('PEXPIRE', KEYS[k], list[2]) end
  end
end
