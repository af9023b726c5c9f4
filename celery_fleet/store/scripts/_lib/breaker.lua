-- _lib/breaker: included (not run) by acquire and release: a limit's circuit breaker.
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

-- breaker_count(key, lease, verdict, now, rate_limit, min_calls, window, rate_fails): the
-- outcome ("ok", "fail", "overload", "congestion", "rate", "neutral") of the call that held
-- lease, counted. The probe's result closes or re-opens; any other call counts in a
-- sliding window (current + weighted previous, `window` ms) and the breaker opens when at
-- least min_calls saw a failure rate of rate_limit (rate signals count as failures when
-- rate_fails is 1). Returns the transition it caused: "", "open" or "closed".
local function breaker_count(key, lease, verdict, now, rate_limit, min_calls, window, rate_fails)
  local BREAKER_TTL_MS = 86400000
  local function ms3(x) return string.format('%.3f', x) end
  local failed = verdict == 'fail' or verdict == 'overload'
  if rate_fails == 1 and (verdict == 'congestion' or verdict == 'rate') then failed = true end
  local counts = failed or verdict == 'ok'
  local transition = ''
  local b = redis.call('HMGET', key, 'state', 'probe', 'win_start', 'calls', 'failures',
                       'prev_calls', 'prev_failures', 'forced', 'exp')
  local function reset_counts(state)
    redis.call('HSET', key, 'state', state, 'opened_at', ms3(now), 'win_start', ms3(now),
               'calls', 0, 'failures', 0, 'prev_calls', 0, 'prev_failures', 0)
    redis.call('HDEL', key, 'probe', 'probe_until')
  end
  if b[2] == lease then
    if verdict == 'ok' then
      reset_counts('closed'); transition = 'closed'
    elseif failed then
      reset_counts('open'); transition = 'open'
    else
      redis.call('HDEL', key, 'probe', 'probe_until')  -- no verdict: let another probe
    end
  elseif b[1] ~= 'open' and counts then
    local ws = tonumber(b[3]) or now
    local calls, fails = tonumber(b[4]) or 0, tonumber(b[5]) or 0
    local pcalls, pfails = tonumber(b[6]) or 0, tonumber(b[7]) or 0
    if now - ws >= 2 * window then
      calls, fails, pcalls, pfails, ws = 0, 0, 0, 0, now
    elseif now - ws >= window then
      pcalls, pfails, calls, fails, ws = calls, fails, 0, 0, ws + window
    end
    calls = calls + 1
    if failed then fails = fails + 1 end
    local w = math.max(0, 1 - (now - ws) / window)
    local wcalls, wfails = calls + pcalls * w, fails + pfails * w
    if failed and b[8] ~= 'closed' and wcalls >= min_calls and wfails / wcalls >= rate_limit then
      reset_counts('open'); transition = 'open'
    else
      redis.call('HSET', key, 'win_start', ms3(ws), 'calls', calls, 'failures', fails,
                 'prev_calls', pcalls, 'prev_failures', pfails)
    end
  end
  -- An operator's override lasts until lifted; the breaker's own state expires when idle
  -- (its TTL refreshed twice a day, as ctl's: "exp" says when it runs out).
  if not b[8] and (b[2] == lease or (b[1] ~= 'open' and counts))
      and (tonumber(b[9]) or 0) < now + BREAKER_TTL_MS / 2 then
    redis.call('HSET', key, 'exp', ms3(now + BREAKER_TTL_MS))
    redis.call('PEXPIRE', key, BREAKER_TTL_MS)
  end
  return transition
end
