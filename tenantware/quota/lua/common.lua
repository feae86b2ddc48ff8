-- Shared by the quota scripts but settle.lua (concatenated in front of each when loaded).
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
