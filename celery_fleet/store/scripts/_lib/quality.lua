-- _lib/quality: included (not run) by quality_count and quality_read: a limit's quality
-- breaker (the Python side is celery_fleet/quality/breaker.py).
--
-- Its hash holds state ("closed" or absent, "open", "half_open"), opened_at (ms),
-- baseline (the garbage rate's rolling baseline) and base_n (the calls it weighs, capped at
-- baseline_calls), probe_calls and probe_garbage (while half-open), a ring of
-- QUALITY_BUCKETS buckets over the window: c<i>, g<i> (calls and garbage judged in bucket
-- i) and t<i> (the bucket number it holds), reason counters r:<name> (halved once a
-- window; rh is the bucket they were last halved at), and incident (the garbage rate of
-- the incident that last opened it: what the probes are told apart from).
-- Time unit: milliseconds, Redis TIME.
--
-- The baseline learns from buckets as they leave the window (folded in when their ring
-- slot is reused), and only while closed: a jump inside the window is compared with what
-- came before it, never with itself. Until it has learnt from min_calls calls (base_n)
-- the breaker does not open: a limit's normal is not known yet.
local QUALITY_BUCKETS = 30
local QUALITY_CHANCE = 1e-6     -- how unlikely garbage must be at the baseline's rate
local QUALITY_CLEAN = 1e-3      -- how unlikely so few garbage must be at the incident's rate
local QUALITY_INCIDENT_CAP = 0.5  -- an incident worse than this is told apart as this
local QUALITY_TTL_MS = 86400000

local function q_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

local function q_bucket(now, window) return math.floor(now / (window / QUALITY_BUCKETS)) end

-- q_ring(key, cur): the calls and garbage of the window ending at bucket cur, by age
-- (index 1 is bucket cur, 2 the one before, ...), and their sums.
local function q_ring(key, cur)
  local fields = {}
  for i = 0, QUALITY_BUCKETS - 1 do
    fields[#fields + 1] = 'c' .. i
    fields[#fields + 1] = 'g' .. i
    fields[#fields + 1] = 't' .. i
  end
  local v = redis.call('HMGET', key, unpack(fields))
  local n, g, calls, garbage = {}, {}, 0, 0
  for age = 1, QUALITY_BUCKETS do n[age], g[age] = 0, 0 end
  for i = 0, QUALITY_BUCKETS - 1 do
    local t = tonumber(v[3 * i + 3])
    if t and t > cur - QUALITY_BUCKETS then
      local age = math.max(cur - t + 1, 1)
      local c, b = tonumber(v[3 * i + 1]) or 0, tonumber(v[3 * i + 2]) or 0
      n[age], g[age] = n[age] + c, g[age] + b
      calls, garbage = calls + c, garbage + b
    end
  end
  return n, g, calls, garbage
end

-- q_window(key, cur): the calls and garbage of the buckets of the window ending at cur.
local function q_window(key, cur)
  local _, _, calls, garbage = q_ring(key, cur)
  return calls, garbage
end

-- q_tail(n, x, p): the chance of x or more garbage in n calls at a garbage rate p
-- (binomial; Poisson, mean n*p, above 1,000 calls), from the tail's first term on. Only
-- asked once the rate is already above min_rate and ratio x the baseline, so its loops
-- never run on healthy traffic.
local function q_tail(n, x, p)
  if x <= 0 then return 1 end
  if x > n then return 0 end
  local log_term  -- log of P(X = x)
  if n <= 1000 then
    log_term = x * math.log(p) + (n - x) * math.log(1 - p)
    for i = 1, x do log_term = log_term + math.log(n - x + i) - math.log(i) end
  else
    local mean = n * p
    log_term = -mean + x * math.log(mean)
    for i = 1, x do log_term = log_term - math.log(i) end
  end
  local term, sum, k = math.exp(log_term), 0, x
  while term > sum * 1e-12 and k <= n do
    sum = sum + term
    if n <= 1000 then term = term * (n - k) / (k + 1) * p / (1 - p)
    else term = term * n * p / (k + 1) end
    k = k + 1
  end
  return sum
end

-- q_degraded: garbage of calls is a degradation against the baseline: a rate of at least
-- min_rate and ratio times the baseline, and more garbage than the baseline's noise
-- explains: at the baseline's rate (at least 1%), that much garbage or more in that many
-- calls would come by chance less than once in QUALITY_CHANCE asks. An exact tail, not a
-- normal approximation: over a few dozen calls the binomial's tail is far heavier than
-- the normal's (4 deviations opened a steady 2% about once an hour at 2 calls/s).
local function q_degraded(calls, garbage, baseline, ratio, min_rate)
  if calls <= 0 then return false end
  local rate = garbage / calls
  if rate < min_rate or rate < ratio * baseline then return false end
  local p = math.max(baseline, 0.01)
  if rate <= p then return false end  -- no more than expected (and the tail starts past it)
  return q_tail(calls, garbage, p) < QUALITY_CHANCE
end

-- q_low(n, x, p): the chance of x or less garbage in n calls at a garbage rate p (the
-- binomial's lower tail), from its last term down; 1 when x is not below the mean.
local function q_low(n, x, p)
  if n <= 0 or x >= n * p then return 1 end
  local log_term = x * math.log(p) + (n - x) * math.log(1 - p)  -- log of P(X = x)
  for i = 1, x do log_term = log_term + math.log(n - x + i) - math.log(i) end
  local term, sum, k = math.exp(log_term), 0, x
  while k >= 0 and term > sum * 1e-12 do
    sum = sum + term
    term = term * k / (n - k + 1) * (1 - p) / p
    k = k - 1
  end
  return sum
end

-- q_floor(baseline, ratio, min_rate): the least garbage rate an incident has (the rate
-- the opening test starts at).
local function q_floor(baseline, ratio, min_rate)
  return math.max(min_rate, ratio * baseline, math.max(baseline, 0.01))
end

-- q_clean(calls, garbage, incident, baseline, ratio, min_rate): those calls tell the
-- garbage rate apart from the incident's: at the incident's rate (at least where
-- degradation starts, at most QUALITY_INCIDENT_CAP), so little garbage in so many calls
-- would come by chance less than once in 1/QUALITY_CLEAN; the mirror of q_degraded.
local function q_clean(calls, garbage, incident, baseline, ratio, min_rate)
  local p = math.min(math.max(incident, q_floor(baseline, ratio, min_rate)), QUALITY_INCIDENT_CAP)
  return q_low(calls, garbage, p) < QUALITY_CLEAN
end

-- q_llr(n, x, p): how much likelier x garbage of n calls is at their own rate than at p
-- (log; 0 unless the rate is above p).
local function q_llr(n, x, p)
  if n <= 0 or x <= n * p then return 0 end
  local r, llr = x / n, x * math.log(x / n / p)
  if r < 1 then llr = llr + (n - x) * math.log((1 - r) / (1 - p)) end
  return llr
end

-- q_incident(key, cur, baseline, ratio, min_rate): the window's incident, once the
-- window is degraded: the run of buckets whose garbage most departs from the baseline
-- (the likeliest stretch of the change), its garbage rate, and whether the calls after
-- it are clean against that rate (the incident is over: its garbage is only still in
-- the window, and opening now would only keep the breaker open past it). Reply:
-- incident rate, over (true or false).
local function q_incident(key, cur, baseline, ratio, min_rate)
  local n, g = q_ring(key, cur)
  local p = math.max(baseline, 0.01)
  local best, rate, after_n, after_g = -1, 0, 0, 0
  local before_n, before_g = 0, 0  -- the calls newer than the run's newest bucket
  for newest = 1, QUALITY_BUCKETS do
    local cn, cg = 0, 0
    for oldest = newest, QUALITY_BUCKETS do
      cn, cg = cn + n[oldest], cg + g[oldest]
      local llr = q_llr(cn, cg, p)
      if llr > best then best, rate, after_n, after_g = llr, cg / cn, before_n, before_g end
    end
    before_n, before_g = before_n + n[newest], before_g + g[newest]
  end
  return rate, q_clean(after_n, after_g, rate, baseline, ratio, min_rate)
end

-- q_state(key, now, reset_ms, ratio, min_rate): the state, opened_at, baseline, base_n,
-- probe counts, the transition reading it caused (an open breaker half-opens reset_ms
-- after it opened) and the incident's garbage rate.
local function q_state(key, now, reset_ms, ratio, min_rate)
  local h = redis.call('HMGET', key, 'state', 'opened_at', 'baseline', 'base_n',
                       'probe_calls', 'probe_garbage', 'incident')
  local state = h[1] or 'closed'
  local opened_at = tonumber(h[2]) or 0
  local baseline = tonumber(h[3]) or 0
  local base_n = tonumber(h[4]) or 0
  local pc, pg = tonumber(h[5]) or 0, tonumber(h[6]) or 0
  local incident = tonumber(h[7]) or 0
  local transition = ''
  if state == 'open' and now >= opened_at + reset_ms then
    state, transition, pc, pg = 'half_open', 'half_open', 0, 0
    redis.call('HSET', key, 'state', state, 'probe_calls', 0, 'probe_garbage', 0)
  end
  return state, opened_at, baseline, base_n, pc, pg, transition, incident
end

-- q_reasons(key, reply): append each reason counter (name, count) to reply.
local function q_reasons(key, reply)
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    if string.sub(all[j], 1, 2) == 'r:' then
      reply[#reply + 1] = string.sub(all[j], 3)
      reply[#reply + 1] = all[j + 1]
    end
  end
end

local function q_wait(state, opened_at, now, reset_ms)
  if state ~= 'open' then return 0 end
  return math.max(0, math.floor(opened_at + reset_ms - now))
end
