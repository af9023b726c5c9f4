-- _lib/ctl: included (not run) by scripts that write a limit's ctl hash: acquire, release,
-- settle, observe. See store.script_source() and "--#include".
--
-- ctl_expiry(hset, exp, now, horizon): the hash lives a day past its last use and past
-- every arrival time in it (horizon, ms). Its "exp" field says when its TTL runs out; only
-- when less than half a day of that is left (or the horizon passes it) is the TTL set
-- again, so a busy limit pays one PEXPIRE twice a day, not one per call. Adds the new "exp"
-- to hset (the caller's HSET must come first: PEXPIRE on a missing key does nothing) and
-- returns the TTL to PEXPIRE, or false when none is due.
local function ctl_expiry(hset, exp, now, horizon)
  local base = math.max(now, horizon)
  if exp and exp >= base + 43200000 then return false end
  hset[#hset + 1] = 'exp'
  hset[#hset + 1] = string.format('%.0f', base + 86400000)
  return math.ceil(base + 86400000 - now)
end
