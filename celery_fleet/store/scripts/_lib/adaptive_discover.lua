-- _lib/adaptive_discover: included (not run) by release: what a call teaches a limit's
-- capacity discovery ("discover": {"up_to": ...}; admission/discover.py). Time unit: ms,
-- Redis TIME.
--
-- The learned factor "disc" (1..up_to, a multiple of the declared rate) lives in the limit's
-- ctl hash beside the windows, read by acquire (_lib/gcra.lua discover_factor) at no extra
-- round trip, and is trusted until disc_until (ms; `remember` after it last moved or was
-- used at its ceiling): a restarted process, or another one, starts from it.
--
-- discover_learn(key, outcome, acquired, now, up_to, increase, decrease, probe_base,
-- remember, adaptive): the outcome left for the adaptive limit ("neutral" when discovery
-- took it). ctl fields: disc, disc_at (ms: when it last grew), disc_hit (ms: when acquire
-- last refused a call because a window was spent: the declared ceiling binds), disc_ceiling
-- (the factor a 429 last came at), disc_probe_ms, disc_probe_after, disc_cut (ms),
-- disc_until; provider_factor(_until) (the headers' limit over the declared one, observe.lua).
--
-- Additive increase: an ok call while the ceiling binds (a window refusal within 2 s) grows
-- disc by `increase` per second of such calls, never above up_to nor the provider's header
-- factor while fresh; a factor that failed (disc_ceiling) is approached to 2% below it and
-- not passed before disc_probe_after; each failed probe of it doubles that wait (at most 8
-- probe intervals). Multiplicative decrease: a 429 of a call admitted after the last cut
-- (one cut per congestion event) multiplies disc by `decrease` (never below 1: under the
-- declared rate is the adaptive limit's business, which then sees the 429 itself).
local function discover_learn(key, outcome, acquired, now, up_to, increase, decrease,
                              probe_base, remember, adaptive)
  local cuts = outcome == 'rate' or (outcome == 'congestion' and not adaptive)
  if not cuts and outcome ~= 'ok' then return outcome end
  local s = redis.call('HMGET', key, 'disc', 'disc_at', 'disc_hit', 'disc_ceiling',
                       'disc_probe_ms', 'disc_probe_after', 'disc_cut', 'disc_until',
                       'provider_factor', 'provider_factor_until')
  local disc, at = tonumber(s[1]) or 1, tonumber(s[2]) or now
  local ceiling, probe_ms = tonumber(s[4]), tonumber(s[5]) or probe_base
  local probe_after, cut_at = tonumber(s[6]) or 0, tonumber(s[7]) or 0
  if (tonumber(s[8]) or 0) <= now then
    -- nothing learned, or forgotten: the declared rate, and no failed factor to avoid
    disc, ceiling, probe_ms, probe_after = 1, nil, probe_base, 0
  end
  disc = math.min(up_to, math.max(1, disc))
  local f5 = function(x) return string.format('%.5f', x) end
  local until_ms = string.format('%.0f', now + remember)
  if cuts then
    if disc <= 1 then return outcome end
    if acquired < cut_at then return 'neutral' end  -- the same overshoot, already cut
    local level = disc
    if ceiling and level <= ceiling * 1.02 and acquired >= probe_after then
      probe_ms = math.min(probe_ms * 2, probe_base * 8)  -- a failed probe of the same level
    elseif not (ceiling and level <= ceiling * 1.02) then
      probe_ms = probe_base
    end
    disc = math.max(1, level * decrease)
    redis.call('HSET', key, 'disc', f5(disc), 'disc_ceiling', f5(level), 'disc_probe_ms',
               probe_ms, 'disc_probe_after', string.format('%.3f', now + probe_ms),
               'disc_cut', string.format('%.3f', now), 'disc_at', string.format('%.3f', now),
               'disc_until', until_ms)
    return 'neutral'
  end
  if now - (tonumber(s[3]) or 0) > 2000 then
    -- the ceiling does not bind: no growth; growth resumes from when it binds again
    if now - at > 1000 then redis.call('HSET', key, 'disc_at', string.format('%.3f', now)) end
    return outcome
  end
  local bound = up_to
  local pf, pf_until = tonumber(s[9]), tonumber(s[10]) or 0
  if pf and pf_until > now and pf < bound then bound = math.max(1, pf) end
  local new = disc + increase * math.min(1000, math.max(0, now - at)) / 1000
  if ceiling then
    if now < probe_after then
      new = math.min(new, math.max(disc, ceiling * 0.98))  -- hold below the failed factor
    elseif new > ceiling * 1.1 then
      ceiling = nil
      redis.call('HDEL', key, 'disc_ceiling', 'disc_probe_ms', 'disc_probe_after')
    end
  end
  new = math.min(new, bound)
  redis.call('HSET', key, 'disc', f5(new), 'disc_at', string.format('%.3f', now),
             'disc_until', until_ms)
  return outcome
end
