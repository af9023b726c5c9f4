-- release: give a slot back and report how the call went.
--
-- KEYS[1]  leases   zset   lease -> expiry (ms); a lease is "<acquired µs>.<in flight then>.
--                          <tokens>.<id>" (see acquire.lua)
-- KEYS[2]  settled  hash   lease -> tokens it was settled to
-- KEYS[3]  ctl      hash   hold_ms (EWMA, sampled), pause_until, and the adaptive state: cap,
--                          rate_factor, ceiling (in-flight level that last failed), probe_ms,
--                          probe_after, last_cut, last_rate_cut, rate_at (ms), lat_n/lat_slow
--                          (calls and slow calls in the current block of 100, for the latency
--                          target); exp (see _lib/ctl.lua)
-- KEYS[4]  line     zset   ticket id -> order key: callers waiting (see acquire.lua)
-- KEYS[5]  breaker  hash   state, opened_at, forced, probe, probe_until, window counters
-- KEYS[6]  waiting  zset   ticket id -> expiry (ms)
-- KEYS[7]  wake     prefix of the per-process wake-up lists (see _lib/wake.lua)
-- ARGV[1]  lease
-- ARGV[2]  outcome: ok | fail (breaker failure) | overload (AIMD cut + breaker failure) |
--          congestion (AIMD cut of the in-flight cap) | rate (AIMD cut of the rate factor) |
--          neutral (nothing to learn)
-- ARGV[3]  retry-after the provider asked for (ms; 0 = none): pauses admission fleet-wide
-- ARGV[4]  1 = the lease was settled (drop its record from KEYS[2]), else 0
-- ARGV[5]  1 = the caller waits for the reply: read the clock (exact now and held_ms);
--          0 = a posted release nobody waits for: only when something needs it
-- ARGV[6]  the limit's constants, 16 little-endian doubles (struct.unpack: one call instead
--          of a tonumber per argument): max_in_flight (0 = no cap), ticket TTL (ms), wake
--          grace (ms); adaptive (0/1), max cap, min cap, initial cap, increase, decrease,
--          probe interval (ms), latency target (ms, 0 = none); breaker (0/1), failure rate,
--          min calls, window (ms), rate signals count as failures (0/1)
--
-- Reply: {released (1/0), now (µs), held_ms, transition ("", "open", "closed"), cap}
-- now and held_ms are 0 when nothing needed the clock: a posted release with nobody
-- waiting is ZREM and ZCARD only. The mean hold time (for wait estimates) is sampled from
-- one release in 32. ctl and breaker expire after a day without calls (an operator's forced
-- breaker never). Reserved tokens are never refunded here: a failed or refused call's
-- tokens stay spent, as providers count them. Time unit: milliseconds, Redis TIME.

local id = ARGV[1]
local outcome = ARGV[2]
local retry_after = tonumber(ARGV[3])
local max_in_flight, ticket_ttl, grace, adaptive_on, max_cap, min_cap, init_cap, increase,
      decrease, probe_base, target, breaker_on, rate_limit, min_calls, window, rate_fails =
  struct.unpack('<dddddddddddddddd', ARGV[6])
local adaptive = adaptive_on == 1
local breaker = breaker_on == 1
local removed = redis.call('ZREM', KEYS[1], id)
if ARGV[4] == '1' then redis.call('HDEL', KEYS[2], id) end
local now, now_us = nil, 0
local function clock()
  if not now then
    local t = redis.call('TIME')
    now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
    now = now_us / 1000
  end
  return now
end
local fmt = function(x) return string.format('%.3f', x) end
--#include _lib/wake
--#include _lib/ctl
local STATE_TTL_MS = 86400000
-- ctl may have expired (or been reset) while the lease was held: a write here must not
-- leave it without a TTL.
local function ctl_write(exp, ...)
  local hset = {...}
  local refresh = ctl_expiry(hset, exp, clock(), clock())
  redis.call('HSET', KEYS[3], unpack(hset))
  if refresh then redis.call('PEXPIRE', KEYS[3], refresh) end
end

if retry_after > 0 then
  local until_ms = clock() + retry_after
  local old = redis.call('HMGET', KEYS[3], 'pause_until', 'exp')
  if (tonumber(old[1]) or 0) < until_ms then
    ctl_write(tonumber(old[2]), 'pause_until', fmt(until_ms))
  end
end

local held, acquired, acquired_us, at_in_flight = 0, nil, nil, 0
if removed == 1 then
  local a, f = string.match(id, '^(%d+)%.(%d+)%.')
  acquired_us = tonumber(a)
  acquired = acquired_us and acquired_us / 1000
  at_in_flight = tonumber(f) or 0
end
if ARGV[5] == '1' then clock() end
if acquired_us and acquired_us % 32 == 0 then
  held = clock() - acquired
  local old = redis.call('HMGET', KEYS[3], 'hold_ms', 'exp')
  local ewma = held
  if tonumber(old[1]) then ewma = tonumber(old[1]) * 0.8 + held * 0.2 end
  ctl_write(tonumber(old[2]), 'hold_ms', fmt(ewma))
elseif acquired and (adaptive or breaker or now) then
  held = clock() - acquired
end

-- Adaptive limit (AIMD): one cut per congestion event, i.e. only signals from calls admitted
-- after the last cut count; growth only while the cap is in use; a cut lands below the
-- in-flight level that failed, which is not retried before probe_after, and each failed probe
-- of it (a call admitted after probe_after) doubles the wait, up to 8 probe intervals. The rate
-- factor has its own cut clock and grows back with time (one cut's worth per probe
-- interval), not per call. The breaker below sees the caller's outcome, not these rewrites.
local cap = 0
local verdict = outcome
if adaptive and acquired then
  clock()
  local function bounded(x) return math.min(max_cap, math.max(min_cap, x)) end
  local s = redis.call('HMGET', KEYS[3], 'cap', 'ceiling', 'probe_ms', 'probe_after',
                       'last_cut', 'rate_factor', 'last_rate_cut', 'rate_at', 'lat_n', 'lat_slow',
                       'exp')
  -- Whatever is stored (an older version, a changed config), the cap stays in [min, max]
  -- and a remembered failed level only means something strictly above min.
  cap = bounded(tonumber(s[1]) or init_cap)
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
    redis.call('HSET', KEYS[3], 'lat_n', n, 'lat_slow', slow)
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
      redis.call('HSET', KEYS[3], 'cap', fmt(cap), 'ceiling', level, 'probe_ms', probe_ms,
                 'probe_after', fmt(now + probe_ms), 'last_cut', fmt(now))
    else
      -- Nothing below min to protect: remember no failed level, just the cut.
      redis.call('HSET', KEYS[3], 'cap', fmt(cap), 'last_cut', fmt(now))
      redis.call('HDEL', KEYS[3], 'ceiling', 'probe_ms', 'probe_after')
    end
  elseif outcome == 'rate' and acquired >= last_rate_cut then
    factor = math.max(0.05, factor * decrease)
    redis.call('HSET', KEYS[3], 'rate_factor', string.format('%.5f', factor),
               'last_rate_cut', fmt(now), 'rate_at', fmt(now))
  elseif outcome == 'ok' then
    if at_in_flight * 2 >= cap then
      local new = cap + increase / cap
      if ceiling then
        if now < probe_after and new >= ceiling then
          new = math.max(cap, ceiling - 0.001)  -- hold below the failed level, never shrink
        elseif new >= ceiling + 1 then
          redis.call('HDEL', KEYS[3], 'ceiling', 'probe_ms', 'probe_after')
        end
      end
      cap = bounded(new)
      redis.call('HSET', KEYS[3], 'cap', fmt(cap))
    end
    if factor < 1 and now > rate_at then
      factor = math.min(1, factor + (1 - decrease) * (now - rate_at) / probe_base)
      redis.call('HSET', KEYS[3], 'rate_factor', string.format('%.5f', factor), 'rate_at', fmt(now))
    end
  end
  local keep = {}
  local refresh = ctl_expiry(keep, tonumber(s[11]), now, now)
  if refresh then
    redis.call('HSET', KEYS[3], unpack(keep))
    redis.call('PEXPIRE', KEYS[3], refresh)
  end
end

-- Circuit breaker: the probe's result closes or re-opens; otherwise count the call in a
-- sliding window (current + weighted previous) and open on the failure rate.
local transition = ''
if breaker then
  clock()
  local failed = verdict == 'fail' or verdict == 'overload'
  if rate_fails == 1 and (verdict == 'congestion' or verdict == 'rate') then failed = true end
  local counts = failed or verdict == 'ok'
  local b = redis.call('HMGET', KEYS[5], 'state', 'probe', 'win_start', 'calls', 'failures',
                       'prev_calls', 'prev_failures', 'forced', 'exp')
  local function reset_counts(state)
    redis.call('HSET', KEYS[5], 'state', state, 'opened_at', fmt(now), 'win_start', fmt(now),
               'calls', 0, 'failures', 0, 'prev_calls', 0, 'prev_failures', 0)
    redis.call('HDEL', KEYS[5], 'probe', 'probe_until')
  end
  if b[2] == id then
    if verdict == 'ok' then
      reset_counts('closed'); transition = 'closed'
    elseif failed then
      reset_counts('open'); transition = 'open'
    else
      redis.call('HDEL', KEYS[5], 'probe', 'probe_until')  -- no verdict: let another probe
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
      redis.call('HSET', KEYS[5], 'win_start', fmt(ws), 'calls', calls, 'failures', fails,
                 'prev_calls', pcalls, 'prev_failures', pfails)
    end
  end
  -- An operator's override lasts until lifted; the breaker's own state expires when idle
  -- (its TTL refreshed twice a day, as ctl's: "exp" says when it runs out).
  if not b[8] and (b[2] == id or (b[1] ~= 'open' and counts))
      and (tonumber(b[9]) or 0) < now + STATE_TTL_MS / 2 then
    redis.call('HSET', KEYS[5], 'exp', fmt(now + STATE_TTL_MS))
    redis.call('PEXPIRE', KEYS[5], STATE_TTL_MS)
  end
end

-- The line: a release that leaves room under the in-flight cap wakes the oldest waiter
-- (a limit with no cap has no in-flight waiters: its line moves on admissions).
if removed == 1 and redis.call('ZCARD', KEYS[4]) > 0 then
  local dead = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', clock(), 'LIMIT', 0, 16)
  if #dead > 0 then
    redis.call('ZREM', KEYS[4], unpack(dead))
    redis.call('ZREM', KEYS[6], unpack(dead))
  end
  local limit_cap = max_in_flight
  if adaptive then
    local c = cap
    if c <= 0 then c = tonumber(redis.call('HGET', KEYS[3], 'cap')) or init_cap end
    c = math.max(1, math.floor(c))
    if limit_cap == 0 or c < limit_cap then limit_cap = c end
  end
  if limit_cap > 0 and redis.call('ZCARD', KEYS[1]) < limit_cap then
    local head = redis.call('ZRANGE', KEYS[4], 0, 0)[1]
    if head then wake(KEYS[6], KEYS[7], head, ticket_ttl, now + grace) end
  end
end

local cap_s = 0
if cap ~= 0 then cap_s = fmt(cap) end
return {removed, now_us, math.floor(held), transition, cap_s}
