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
-- KEYS[7]  wake     prefix of the per-process wake-up lists (see _lib/line.lua)
-- KEYS[8]  key leases zset  (only for a lease of a key with its own in-flight cap, see
--                          _lib/keys.lua): the lease leaves the key's semaphore too
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
--          min calls, window (ms), rate signals count as failures (0/1); a limit with
--          capacity discovery appends 5 more: up_to, increase (per s), decrease, probe
--          interval (ms), remember (ms) (_lib/adaptive_discover.lua)
--
-- Reply: {released (1/0), now (µs), held_ms, transition ("", "open", "closed"), cap}
-- A limit without breaker, adaptive cap or discovery releases through release_lean.lua
-- when the call leaves nothing else to do (admission/decision.py: release_lean_args).
-- now and held_ms are 0 when nothing needed the clock: a posted release with nobody
-- waiting is ZREM and ZCARD only. The mean hold time (for wait estimates) is sampled from
-- one release in 32. ctl and breaker expire after a day without calls (an operator's forced
-- breaker never). Reserved tokens are never refunded here: a failed or refused call's
-- tokens stay spent, as providers count them. Time unit: milliseconds, Redis TIME.
--
-- Read one part at a time: what the call teaches the adaptive limit
-- (_lib/adaptive_learn.lua), the cap in force (_lib/adaptive.lua), the breaker's count
-- (_lib/breaker_count.lua), the line's sweep and wake-ups (_lib/line.lua),
-- the ctl hash's TTL (_lib/ctl.lua).

local id = ARGV[1]
local outcome = ARGV[2]
local retry_after = tonumber(ARGV[3])
local max_in_flight, ticket_ttl, grace, adaptive_on, max_cap, min_cap, init_cap, increase,
      decrease, probe_base, target, breaker_on, rate_limit, min_calls, window, rate_fails =
  struct.unpack('<dddddddddddddddd', ARGV[6])
local adaptive = adaptive_on == 1
local up_to, disc_increase, disc_decrease, disc_probe, disc_remember = 0, 0, 0, 0, 0
if #ARGV[6] > 128 then
  up_to, disc_increase, disc_decrease, disc_probe, disc_remember =
    struct.unpack('<ddddd', ARGV[6], 129)
end
local breaker = breaker_on == 1
local removed = redis.call('ZREM', KEYS[1], id)
if KEYS[8] then redis.call('ZREM', KEYS[8], id) end
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

--#include _lib/line
--#include _lib/ctl
--#include _lib/breaker_count
--#include _lib/adaptive
--#include _lib/adaptive_learn
--#include _lib/adaptive_discover

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

-- Adaptive limit (_lib/adaptive_learn.lua): the breaker below sees the caller's outcome,
-- not the rewrites of the latency target.
local cap = 0
local verdict = outcome
if up_to > 0 and acquired then
  outcome = discover_learn(KEYS[3], outcome, acquired, clock(), up_to, disc_increase,
                           disc_decrease, disc_probe, disc_remember, adaptive)
end
if adaptive and acquired then
  cap = adaptive_learn(KEYS[3], outcome, acquired, at_in_flight, held, clock(), max_cap,
                       min_cap, init_cap, increase, decrease, probe_base, target)
end

-- Circuit breaker (_lib/breaker_count.lua): the call's outcome, as the caller said it.
local transition = ''
if breaker then
  transition = breaker_count(KEYS[5], id, verdict, clock(), rate_limit, min_calls, window,
                             rate_fails)
end

-- The line: a release that leaves room under the in-flight cap wakes the first waiter
-- (_lib/line.lua's wake_next, which release_lean.lua runs too).
if removed == 1 and redis.call('ZCARD', KEYS[4]) > 0 then
  local stored = nil
  if adaptive then
    stored = cap
    if stored <= 0 then stored = redis.call('HGET', KEYS[3], 'cap') end
  end
  wake_next(KEYS[4], KEYS[1], KEYS[6], KEYS[7], clock(),
            cap_in_force(max_in_flight, init_cap, stored), ticket_ttl, grace)
end

local cap_s = 0
if cap ~= 0 then cap_s = fmt(cap) end
return {removed, now_us, math.floor(held), transition, cap_s}
