-- _lib/breaker: included (not run) by acquire: a limit's circuit breaker, as an ask meets it.
-- What a release counts is in _lib/breaker_count.lua.
--
-- Its hash (the limit's "breaker" key) holds state ("open" or absent/"closed"),
-- opened_at (ms), forced ("open"/"closed": an operator's override, kept until lifted),
-- probe (the lease of the one half-open probe) and probe_until (ms), and the counts of
-- a sliding window: win_start (ms), calls, failures, prev_calls, prev_failures; exp (ms:
-- when its TTL runs out). Time unit: milliseconds, Redis TIME.
--
-- breaker_gate(key, reset_ms, now): what an ask meets, as (wait ms, probe): open refuses
-- until reset_ms after it opened; past it exactly one caller (a lease) probes (probe 1)
-- while the others wait for the probe's answer, at most reset_ms.
local function breaker_gate(key, reset_ms, now)
  local b = redis.call('HMGET', key, 'state', 'opened_at', 'forced', 'probe', 'probe_until')
  if b[3] == 'open' then return reset_ms, 0 end
  if b[3] ~= 'closed' and b[1] == 'open' then
    local half_at = (tonumber(b[2]) or now) + reset_ms
    local probe_until = tonumber(b[5])
    if now < half_at then return half_at - now, 0 end
    if b[4] and probe_until and probe_until > now then
      return math.max(1, math.min(probe_until - now, reset_ms)), 0
    end
    return 0, 1
  end
  return 0, 0
end

