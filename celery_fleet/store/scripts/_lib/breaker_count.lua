-- _lib/breaker_count: included (not run) by release: a call's outcome, counted by the
-- limit's circuit breaker (its hash's fields are described in _lib/breaker.lua, which
-- holds the side an ask meets). Time unit: milliseconds, Redis TIME.

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
