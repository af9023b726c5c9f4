-- quality_count: count one judged call in a limit's quality breaker; open, half-open or
-- close it. Sent in the same write as the slot's release (no round trip of its own).
--
-- KEYS[1]  quality  hash   the breaker (fields in _lib/quality.lua)
-- ARGV[1]  verdict: ok | garbage
-- ARGV[2]  reasons: the detectors that fired, comma-separated ("" when ok)
-- ARGV[3]  window (ms)
-- ARGV[4]  ratio: the garbage rate opens it at ratio * baseline ...
-- ARGV[5]  min_rate: ... and at least this rate ...
-- ARGV[6]  min_calls: ... with at least this many calls judged in the window
-- ARGV[7]  reset timeout (ms): how long it stays open before half-opening
-- ARGV[8]  probes: judged calls while half-open before it closes on a healthy rate
--          (fewer when they already tell it apart from the incident's: q_clean)
-- ARGV[9]  baseline_calls: how many calls the rolling baseline weighs
-- ARGV[10] config: this caller's fingerprint of ARGV[3..9] ("" or absent: not compared);
--          the first count stores it (field cfg), a different one is named in the reply
-- ARGV[11] known baseline: the baseline this caller last saw ("" or absent: none) ...
-- ARGV[12] ... and the calls it weighed (base_n) ...
-- ARGV[13] ... and how long it saw the breaker stay open (ms; 0 unless open): a hash that
--          does not exist (Redis lost it: a restart, an eviction) starts from these
--          instead of an empty baseline, which would learn an ongoing incident as normal
--
-- Reply: {state, transition ("", "open", "half_open", "closed"), calls, garbage (in the
-- window), baseline (string), wait_ms (until it half-opens; 0 unless open), base_n, the
-- fleet's config fingerprint when it differs from ARGV[10] (else ""), then on a
-- transition the reason counters: reason, count, ...}
-- Time unit: milliseconds, Redis TIME. The hash expires a day after its last count.

--#include _lib/quality

local key = KEYS[1]
local garbage = ARGV[1] == 'garbage' and 1 or 0
local window, ratio, min_rate = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local min_calls, reset_ms = tonumber(ARGV[6]), tonumber(ARGV[7])
local probes, baseline_calls = tonumber(ARGV[8]), tonumber(ARGV[9])
local now = q_now()
local known = tonumber(ARGV[11] or '')
if known and redis.call('EXISTS', key) == 0 then
  -- state lost: seed it from what this caller last saw
  local n = math.min(tonumber(ARGV[12] or '') or min_calls, math.max(baseline_calls, 1))
  redis.call('HSET', key, 'baseline', string.format('%.6f', known), 'base_n', n)
  local left = math.min(tonumber(ARGV[13] or '') or 0, reset_ms)
  if left > 0 then
    redis.call('HSET', key, 'state', 'open',
               'opened_at', string.format('%.3f', now - (reset_ms - left)))
  end
end
local config, differs = ARGV[10] or '', ''
if config ~= '' then
  local fleet = redis.call('HGET', key, 'cfg')
  if not fleet then redis.call('HSET', key, 'cfg', config)
  elseif fleet ~= config then differs = fleet end
end
local state, opened_at, baseline, base_n, pc, pg, transition, incident =
  q_state(key, now, reset_ms, ratio, min_rate)

-- This call's bucket; the bucket its ring slot held leaves the window: into the baseline.
local cur = q_bucket(now, window)
local i = cur % QUALITY_BUCKETS
local slot = redis.call('HMGET', key, 'c' .. i, 'g' .. i, 't' .. i)
if tonumber(slot[3]) ~= cur then
  local old_c, old_g = tonumber(slot[1]) or 0, tonumber(slot[2]) or 0
  if state == 'closed' and old_c > 0 then
    local n = math.min(base_n + old_c, math.max(baseline_calls, 1))
    baseline = baseline + (old_g - old_c * baseline) / math.max(base_n + old_c, 1)
    base_n = n
  end
  redis.call('HSET', key, 'c' .. i, 0, 'g' .. i, 0, 't' .. i, cur)
end
-- Reason counters say what the recent garbage is: halved once a window,
-- before this call's are added (halved, a lone first reason would vanish).
local rh = tonumber(redis.call('HGET', key, 'rh'))
if not rh or cur - rh >= QUALITY_BUCKETS then
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    if string.sub(all[j], 1, 2) == 'r:' then
      local half = math.floor(tonumber(all[j + 1]) / 2)
      if half > 0 then redis.call('HSET', key, all[j], half) else redis.call('HDEL', key, all[j]) end
    end
  end
  redis.call('HSET', key, 'rh', cur)
end
redis.call('HINCRBY', key, 'c' .. i, 1)
if garbage == 1 then
  redis.call('HINCRBY', key, 'g' .. i, 1)
  for reason in string.gmatch(ARGV[2], '[^,]+') do
    redis.call('HINCRBY', key, 'r:' .. reason, 1)
  end
end

local calls, bad = q_window(key, cur)
-- open: remember the incident's rate (the probes are told apart from it)
local function open_it(rate)
  state, opened_at, transition = 'open', now, 'open'
  redis.call('HSET', key, 'state', state, 'opened_at', string.format('%.3f', now),
             'incident', string.format('%.6f', rate))
end
if state == 'closed' then
  if calls >= min_calls and base_n >= min_calls
      and q_degraded(calls, bad, baseline, ratio, min_rate) then
    -- not when the incident is over and only its garbage is still in the window
    local rate, over = q_incident(key, cur, baseline, ratio, min_rate)
    if not over then open_it(rate) end
  end
elseif state == 'half_open' then
  pc, pg = pc + 1, pg + garbage
  -- Both ways by an exact tail: too much garbage for the baseline (as soon as the garbage
  -- already seen is enough over `probes` calls) opens it again; too little for the
  -- incident's rate closes it, as does, after `probes` calls, a rate below where
  -- degradation starts. Neither: the probes go on.
  if q_degraded(math.max(pc, probes), pg, baseline, ratio, min_rate) then
    open_it((q_incident(key, cur, baseline, ratio, min_rate)))
  elseif q_clean(pc, pg, incident, baseline, ratio, min_rate) or
         (pc >= probes and pg < pc * q_floor(baseline, ratio, min_rate)) then
    -- close, and forget the window that opened it (it would open it again)
    state, transition, calls, bad = 'closed', 'closed', 0, 0
    local fields = {'probe_calls', 'probe_garbage', 'incident'}
    for j = 0, QUALITY_BUCKETS - 1 do
      fields[#fields + 1] = 'c' .. j
      fields[#fields + 1] = 'g' .. j
      fields[#fields + 1] = 't' .. j
    end
    redis.call('HDEL', key, unpack(fields))
    redis.call('HSET', key, 'state', state)
  else
    redis.call('HSET', key, 'probe_calls', pc, 'probe_garbage', pg)
  end
end
redis.call('HSET', key, 'baseline', string.format('%.6f', baseline), 'base_n', base_n)
redis.call('PEXPIRE', key, QUALITY_TTL_MS)
local reply = {state, transition, calls, bad, string.format('%.6f', baseline),
               q_wait(state, opened_at, now, reset_ms), base_n, differs}
if transition ~= '' then q_reasons(key, reply) end
return reply
