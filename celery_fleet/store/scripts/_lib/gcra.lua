-- _lib/gcra: included (not run) by acquire and peek: the request and token windows.
--
-- Each window is a GCRA bucket: its theoretical arrival time (tat, ms) is stored in the
-- limit's ctl hash under the window's field ("r:60", "t:86400"). A call costing `step` ms
-- of emission (cost * T) fits while tat + step - tau <= now; passing moves tat by step.
-- An absent or past tat is now: a full bucket. Time unit: milliseconds, Redis TIME.
--
-- rate_factor(adaptive, provider, provider_until, now): the factor f (0.01..1) that
-- stretches every window's T to T/f (tau stays in ms, so both rate and burst shrink by f):
-- the adaptive one (nil when the limit has none), or the provider's from its rate-limit
-- headers while fresh (provider_until > now), whichever is smaller.
local function rate_factor(adaptive, provider, provider_until, now)
  local factor = adaptive or 1
  if provider and (provider_until or 0) > now and provider < factor then
    factor = provider
  end
  if not (factor > 0 and factor <= 1) then factor = 1 end
  if factor < 0.01 then factor = 0.01 end
  return factor
end

-- discover_factor(adaptive, disc, disc_until, provider, provider_until, now, up_to): the
-- rate factor of a limit with capacity discovery (up_to > 0, admission/discover.py): the
-- learned multiple of the declared rate (disc, 1..up_to, while disc_until > now) times the
-- adaptive factor (<= 1, nil when the limit has none), never above the provider's header
-- factor while fresh (which may then be above 1, up to up_to). In 0.01..up_to.
local function discover_factor(adaptive, disc, disc_until, provider, provider_until, now, up_to)
  local learned = 1
  if disc and (disc_until or 0) > now then learned = math.min(up_to, math.max(1, disc)) end
  local factor = (adaptive or 1) * learned
  if provider and (provider_until or 0) > now and provider < factor then
    factor = provider
  end
  if not (factor > 0 and factor <= up_to) then factor = 1 end
  if factor < 0.01 then factor = 0.01 end
  return factor
end

-- gcra_check(stored, step, tau, now): a call costing `step` against a window whose
-- stored arrival time is `stored`: the arrival time as of now (tat), and the ms until the
-- call fits (0: it fits now, and passing moves the arrival time to tat + step).
local function gcra_check(stored, step, tau, now)
  local tat = tonumber(stored) or now
  if tat < now then tat = now end
  local allow_at = tat + step - tau
  if allow_at > now then return tat, allow_at - now end
  return tat, 0
end

-- gcra_room(tat, step, tau, now): how many calls of `step` fit now (<= 0: none).
local function gcra_room(tat, step, tau, now)
  return math.floor((now + tau - tat) / step)
end
