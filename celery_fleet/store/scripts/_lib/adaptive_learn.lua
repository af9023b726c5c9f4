-- _lib/adaptive_learn: included (not run) by release: what a call teaches a limit's
-- adaptive state (AIMD on the in-flight cap, the rate factor, the latency target).
-- Time unit: milliseconds, Redis TIME.

--#include _lib/ctl

-- adaptive_learn(key, outcome, acquired, at_in_flight, held, now, max_cap, min_cap,
-- init_cap, increase, decrease, probe_base, target): what a released call teaches the
-- limit's learned state in ctl (`key`): the in-flight cap (cap, ceiling, probe_ms,
-- probe_after, last_cut), the rate factor (rate_factor, last_rate_cut, rate_at) and the
-- latency target's block counts (lat_n, lat_slow). acquired: when the call was admitted
-- (ms); at_in_flight: how many were in flight then; held: how long it ran (ms). Returns
-- the cap now.
--
-- AIMD: one cut per congestion event, i.e. only signals from calls admitted
-- after the last cut count; growth only while the cap is in use; a cut lands below the
-- in-flight level that failed, which is not retried before probe_after, and each failed probe
-- of it (a call admitted after probe_after) doubles the wait, up to 8 probe intervals. The rate
-- factor has its own cut clock and grows back with time (one cut's worth per probe
-- interval), not per call. A latency target rewrites an "ok" as "congestion" here only.
local function adaptive_learn(key, outcome, acquired, at_in_flight, held, now, max_cap, min_cap,
                              init_cap, increase, decrease, probe_base, target)
  local function ms3(x) return string.format('%.3f', x) end
  local function bounded(x) return math.min(max_cap, math.max(min_cap, x)) end
  local s = redis.call('HMGET', key, 'cap', 'ceiling', 'probe_ms', 'probe_after',
                       'last_cut', 'rate_factor', 'last_rate_cut', 'rate_at', 'lat_n', 'lat_slow',
                       'exp')
  -- Whatever is stored (an older version, a changed config), the cap stays in [min, max]
  -- and a remembered failed level only means something strictly above min.
  local cap = bounded(tonumber(s[1]) or init_cap)
  local ceiling, probe_ms = tonumber(s[2]), tonumber(s[3]) or probe_base
  if ceiling and (ceiling <= min_cap or ceiling > max_cap) then ceiling = nil end
  local probe_after, last_cut = tonumber(s[4]) or 0, tonumber(s[5]) or 0
  local factor, last_rate_cut = tonumber(s[6]) or 1, tonumber(s[7]) or 0
  local rate_at = tonumber(s[8]) or now
  if outcome == 'ok' and target > 0 then
    -- p99 over the target: more than 1% of a block of 100 calls slower than it
    local n, slow = (tonumber(s[9]) or 0) + 1, tonumber(s[10]) or 0
    if held > target then slow = slow + 1 end
    if n >= 100 then
      if slow > n * 0.01 then outcome = 'congestion' end
      n, slow = 0, 0
    end
    redis.call('HSET', key, 'lat_n', n, 'lat_slow', slow)
  end
  if (outcome == 'congestion' or outcome == 'overload') and acquired >= last_cut then
    local level = math.floor(cap)
    if ceiling and math.floor(ceiling) == level then
      -- The level that failed before failed again. Only a call admitted after the wait
      -- was a probe of it: then wait twice as long (at most 8 probe intervals, so a
      -- provider whose capacity came back is found within that); otherwise keep the wait.
      if acquired >= probe_after then probe_ms = math.min(probe_ms * 2, probe_base * 8) end
    else
      probe_ms = probe_base
    end
    -- Land below the level that failed, so it is not admitted again before probe_after
    -- (a mild decrease such as 0.95 would otherwise leave the cap at the same level).
    cap = bounded(math.min(cap * decrease, level - 0.001))
    if level > min_cap then
      redis.call('HSET', key, 'cap', ms3(cap), 'ceiling', level, 'probe_ms', probe_ms,
                 'probe_after', ms3(now + probe_ms), 'last_cut', ms3(now))
    else
      -- Nothing below min to protect: remember no failed level, just the cut.
      redis.call('HSET', key, 'cap', ms3(cap), 'last_cut', ms3(now))
      redis.call('HDEL', key, 'ceiling', 'probe_ms', 'probe_after')
    end
  elseif outcome == 'rate' and acquired >= last_rate_cut then
    factor = math.max(0.05, factor * decrease)
    redis.call('HSET', key, 'rate_factor', string.format('%.5f', factor),
               'last_rate_cut', ms3(now), 'rate_at', ms3(now))
  elseif outcome == 'ok' then
    if at_in_flight * 2 >= cap then
      local new = cap + increase / cap
      if ceiling then
        if now < probe_after and new >= ceiling then
          new = math.max(cap, ceiling - 0.001)  -- hold below the failed level, never shrink
        elseif new >= ceiling + 1 then
          redis.call('HDEL', key, 'ceiling', 'probe_ms', 'probe_after')
        end
      end
      cap = bounded(new)
      redis.call('HSET', key, 'cap', ms3(cap))
    end
    if factor < 1 and now > rate_at then
      factor = math.min(1, factor + (1 - decrease) * (now - rate_at) / probe_base)
      redis.call('HSET', key, 'rate_factor', string.format('%.5f', factor), 'rate_at', ms3(now))
    end
  end
  local keep = {}
  local refresh = ctl_expiry(keep, tonumber(s[11]), now, now)
  if refresh then
    redis.call('HSET', key, unpack(keep))
    redis.call('PEXPIRE', key, refresh)
  end
  return cap
end
