-- _lib/adaptive: included (not run) by acquire, release and peek: the in-flight cap in
-- force. What a released call teaches the adaptive limit is in _lib/adaptive_learn.lua.

-- cap_in_force(max_in_flight, init_cap, stored): the cap admissions are held to: the
-- configured max_in_flight (0 = none) or, for an adaptive limit (init_cap > 0), the
-- learned cap in ctl's "cap" (stored; init_cap before anything was learned), rounded
-- down and at least 1, whichever is smaller. 0 means no cap.
local function cap_in_force(max_in_flight, init_cap, stored)
  local cap = max_in_flight
  if init_cap > 0 then
    local learned = math.max(1, math.floor(tonumber(stored) or init_cap))
    if cap == 0 or learned < cap then cap = learned end
  end
  return cap
end

