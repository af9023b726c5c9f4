-- _lib/pause: included (not run) by acquire and peek: a provider's Retry-After pause.
--
-- release.lua writes ctl's "pause_until" (ms, Redis TIME) when a call came back with a
-- Retry-After; until then nobody in the fleet is admitted.
--
-- pause_wait(pause_until, now): ms the pause still runs (0: none).
local function pause_wait(pause_until, now)
  local until_ms = tonumber(pause_until)
  if until_ms and until_ms > now then return until_ms - now end
  return 0
end
