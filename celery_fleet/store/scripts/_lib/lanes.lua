-- _lib/lanes: included (not run) by acquire: what a priority lane may use and is owed.
--
-- ARGV[5] of acquire says the caller's lane (admission/lanes.py, Lane.arg):
--   "<p>"                  a lane that may use every budget ("0": a limit without lanes)
--   "<p>:<share>"          may use only its share of each budget (1 - the reserves above)
--   "<p>:<share>:<g>"      ... and is guaranteed g of each budget when it waits (every
--                          lane but the first: its reserve; the lowest: what the reserves
--                          leave, its share)
-- followed by "|<q>:<g>" for each lane below that has a guarantee, highest first.
--
-- A lane is *owed* while it holds fewer than floor(cap * g) in flight and has spent no
-- more than g of each window lately (its guarantee clock "g<p>:<field>" in the limit's
-- ctl is not ahead of now: each of its admissions moves it by step / g). A waiting
-- ticket of an owed lane goes before the tickets of the lanes above, and the lanes above
-- leave it the budget it is owed: so a saturated higher lane never starves a lower one
-- below what the reserves leave it, and the lower lane never takes more than that while
-- the higher one waits.

local LANE_SPAN = 4398046511104  -- 2^42: a lane's part of the line's order key

-- lane_arg(arg): priority, usable share, guarantee (0: none), the lanes below ("q:g|..."
-- or nil).
local function lane_arg(arg)
  if arg == '0' then return 0, 1, 0, nil end
  local head, below = string.match(arg, '^([^|]*)|(.*)$')
  head = head or arg
  local p, u, g = string.match(head, '^(%d+):([^:]+):?(.*)$')
  if p then return tonumber(p), tonumber(u), tonumber(g) or 0, below end
  return tonumber(head), 1, 0, below
end

-- The rest is defined only for a caller in a lane (ARGV[5] not "0"): a limit without
-- lanes does not pay for making these closures on every admission (see _lib/keys.lua).
local lane_census, held_from, lane_owed
if ARGV[5] ~= '0' then

-- lane_census(leases, now): live leases per lane priority. A lease is in the lane its
-- "~<p>" says (before a key's "-k<hash>"); one without is counted below every lane (999).
lane_census = function(leases, now)
  local by = {}
  for _, l in ipairs(redis.call('ZRANGEBYSCORE', leases, now, '+inf')) do
    local q = tonumber(string.match(l, '~(%d+)$') or string.match(l, '~(%d+)%-k[^~]*$') or 999)
    by[q] = (by[q] or 0) + 1
  end
  return by
end

-- held_from(census, p): leases of lane p and every lane below it.
held_from = function(census, p)
  local n = 0
  for q, c in pairs(census) do
    if q >= p then n = n + c end
  end
  return n
end

-- lane_owed(held, cap, g, clocks, now): whether a lane holding `held` leases, with
-- guarantee g and guarantee clocks `clocks` (one per window, as HMGET read them), is owed.
lane_owed = function(held, cap, g, clocks, now)
  if cap > 0 and held >= math.floor(cap * g) then return false end
  for i = 1, #clocks do
    if (tonumber(clocks[i]) or 0) > now then return false end
  end
  return true
end

end
