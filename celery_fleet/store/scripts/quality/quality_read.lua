-- quality_read: a limit's quality breaker as admission and status see it; an open breaker
-- whose reset timeout has passed half-opens here (the one write it may make).
--
-- KEYS[1]  quality  hash   the breaker (fields in _lib/quality.lua)
-- ARGV[1]  window (ms)
-- ARGV[2]  ratio
-- ARGV[3]  min_rate
-- ARGV[4]  reset timeout (ms)
--
-- Reply: {state, transition ("" or "half_open"), calls, garbage (in the window), baseline
-- (string), wait_ms (until it half-opens; 0 unless open), base_n, "" (as quality_count's
-- reply), reason, count, reason, count...}
-- Time unit: milliseconds, Redis TIME.

--#include _lib/quality

local key = KEYS[1]
local window, ratio, min_rate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reset_ms = tonumber(ARGV[4])
local now = q_now()
local state, opened_at, baseline, base_n, _, _, transition, _ =
  q_state(key, now, reset_ms, ratio, min_rate)
local calls, bad = q_window(key, q_bucket(now, window))
local reply = {state, transition, calls, bad, string.format('%.6f', baseline),
               q_wait(state, opened_at, now, reset_ms), base_n, ''}
q_reasons(key, reply)
return reply
