-- acquire: admit one call against every budget of a limit, all or nothing, in ticket order.
--
-- KEYS[1]  gcra     hash   window field ("r:60", "t:86400") -> theoretical arrival time (ms)
-- KEYS[2]  leases   zset   lease id -> expiry (ms); the in-flight semaphore
-- KEYS[3]  holders  hash   lease id -> "<reserved tokens> <acquired at ms> <in flight then>"
-- KEYS[4]  ctl      hash   fleet-wide control state written by release/observe:
--                          pause_until (ms), cap (adaptive in-flight cap, float),
--                          rate_factor (adaptive, 0..1), provider_factor (0..1, from rate-limit
--                          headers) until provider_factor_until (ms), hold_ms (EWMA)
-- KEYS[5]  line     zset   ticket id -> order key (lane * 2^42 + first-asked ms): the waiters
-- KEYS[6]  breaker  hash   state ("open"), opened_at, forced ("open"/"closed"), probe, probe_until
-- KEYS[7]  waiting  zset   ticket id -> expiry (ms): a ticket is a lease on a place in line
-- KEYS[8]  wake     prefix of the per-ticket wake-up lists: KEYS[8] .. ticket id. The lists
--                    share the limit's hash tag (so the slot is KEYS[8]'s); which ticket to
--                    wake is only known in here, hence a prefix rather than a full key.
-- ARGV[1]  lease id, which is also the caller's ticket id while it waits
-- ARGV[2]  tokens this call reserves (cost in every "t:" window; "r:" windows cost 1)
-- ARGV[3]  order: first-asked time (ms, Redis clock; 0 = now), the caller's age in line
-- ARGV[4]  join: 1 = a refused caller takes (or keeps) a ticket; 0 = ask once, no ticket
-- ARGV[5]  lane (0 for now: the order key leaves room for priority lanes)
-- ARGV[6]  lease TTL (ms)
-- ARGV[7]  max_in_flight (0 = no cap)
-- ARGV[8]  adaptive initial cap (0 = not adaptive: ctl.cap and rate_factor are ignored)
-- ARGV[9]  breaker reset timeout (ms; 0 = no breaker)
-- ARGV[10] ticket TTL (ms): a waiter that stops asking loses its ticket after this
-- ARGV[11] wake grace (ms): a woken ticket that does not ask within this is dropped
-- ARGV[12] number of windows n, then n triples: field, emission interval T (ms), tolerance tau (ms)
--
-- Reply: {1, 0, lease id, in_flight, now, probe, 0, line}         admitted (probe=1: half-open)
--        {0, wait_ms, reason, in_flight, now, 0, ahead, line}     refused, nothing consumed
-- reason: "circuit_open", "paused", "in_flight", "queued" (a budget is free but older tickets
-- come first) or the refusing window's field. ahead: tickets before the caller's place; line:
-- tickets waiting. wait_ms is an integer (ceil), an estimate for "in_flight" and "queued";
-- now is Redis TIME in ms as a string. Time unit: milliseconds.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local lease_id = ARGV[1]
local tokens = tonumber(ARGV[2])
local since = tonumber(ARGV[3])
local join = ARGV[4] == '1'
local lane = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local max_in_flight = tonumber(ARGV[7])
local init_cap = tonumber(ARGV[8])
local reset_ms = tonumber(ARGV[9])
local ticket_ttl = tonumber(ARGV[10])
local grace = tonumber(ARGV[11])
local nwin = tonumber(ARGV[12])
local now_s = string.format('%.3f', now)
local MAX_WAIT_MS = 2 ^ 50
local BIG = 2 ^ 50

-- A holder killed with SIGKILL never releases: its lease simply expires here.
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 256)
if #expired > 0 then
  redis.call('ZREM', KEYS[2], unpack(expired))
  redis.call('HDEL', KEYS[3], unpack(expired))
end

local wait = 0
local reason = ''
local function refuse(ms, why)
  if ms > wait then wait = ms; reason = why end
end

-- Circuit breaker: open refuses until reset; past it exactly one caller (a lease) probes.
local probe = 0
if reset_ms > 0 then
  local b = redis.call('HMGET', KEYS[6], 'state', 'opened_at', 'forced', 'probe', 'probe_until')
  if b[3] == 'open' then
    refuse(reset_ms, 'circuit_open')
  elseif b[3] ~= 'closed' and b[1] == 'open' then
    local half_at = (tonumber(b[2]) or now) + reset_ms
    local probe_until = tonumber(b[5])
    if now < half_at then
      refuse(half_at - now, 'circuit_open')
    elseif b[4] and probe_until and probe_until > now then
      refuse(math.max(1, math.min(probe_until - now, reset_ms)), 'circuit_open')
    else
      probe = 1
    end
  end
end

local ctl = redis.call('HMGET', KEYS[4], 'pause_until', 'cap', 'hold_ms', 'rate_factor',
                      'provider_factor', 'provider_factor_until')
local pause_until = tonumber(ctl[1])
if pause_until and pause_until > now then
  refuse(pause_until - now, 'paused')
end

-- slack: how many calls like this one could pass right now; unit: the time one call's worth
-- of the binding budget takes to come back (to estimate waits in line).
local slack, unit = BIG, 0
local in_flight = redis.call('ZCARD', KEYS[2])
local cap = max_in_flight
if init_cap > 0 then
  local ctl_cap = tonumber(ctl[2]) or init_cap
  ctl_cap = math.max(1, math.floor(ctl_cap))
  if cap == 0 or ctl_cap < cap then cap = ctl_cap end
end
if cap > 0 then
  -- Nobody knows when a holder finishes: estimate from the mean hold time, never
  -- later than the first lease expiry, never a busy loop.
  unit = math.max(1, (tonumber(ctl[3]) or 200) / cap)
  slack = cap - in_flight
  if in_flight >= cap then
    local hint = math.max(5, unit)
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if first[2] then hint = math.min(hint, math.max(1, tonumber(first[2]) - now)) end
    refuse(hint, 'in_flight')
  end
end

-- A rate factor f < 1 stretches T to T/f and keeps tau in ms: both the rate and the burst
-- shrink by f. It is the adaptive one, or the headers' one while it is fresh, the smaller.
local factor = 1
if init_cap > 0 then factor = tonumber(ctl[4]) or 1 end
local provider_factor = tonumber(ctl[5])
if provider_factor and (tonumber(ctl[6]) or 0) > now and provider_factor < factor then
  factor = provider_factor
end
if not (factor > 0 and factor <= 1) then factor = 1 end
if factor < 0.01 then factor = 0.01 end
local fields, new_tats = {}, {}
local horizon = now
if nwin > 0 then
  for i = 1, nwin do fields[i] = ARGV[10 + 3 * i] end
  local tats = redis.call('HMGET', KEYS[1], unpack(fields))
  for i = 1, nwin do
    local field = fields[i]
    local emission = tonumber(ARGV[11 + 3 * i]) / factor
    local tolerance = tonumber(ARGV[12 + 3 * i])
    local cost = 1
    if string.sub(field, 1, 1) == 't' then cost = tokens end
    local tat = tonumber(tats[i]) or now
    if tat < now then tat = now end
    local step = cost * emission
    local new_tat = tat + step
    local allow_at = new_tat - tolerance
    if allow_at > now then
      refuse(allow_at - now, field)
      new_tats[i] = tat
    else
      new_tats[i] = new_tat
      -- at least 1: this call fits (rounding must not turn "fits" into "queued")
      if step > 0 then
        slack = math.min(slack, math.max(1, math.floor((now + tolerance - tat) / step)))
      end
    end
    if step > unit then unit = step end
    if new_tats[i] > horizon then horizon = new_tats[i] end
  end
end

-- The line: callers refused before wait in order of age; nobody passes an older ticket.
local nline = redis.call('ZCARD', KEYS[5])
local mine = nil
local ahead = 0
if nline > 0 then
  local dead = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now, 'LIMIT', 0, 64)
  if #dead > 0 then
    redis.call('ZREM', KEYS[5], unpack(dead))
    redis.call('ZREM', KEYS[7], unpack(dead))
    nline = redis.call('ZCARD', KEYS[5])
  end
end
if since <= 0 then since = now end
local score = lane * 4398046511104 + math.floor(since)
if nline > 0 then
  mine = redis.call('ZSCORE', KEYS[5], lease_id)
  if mine then
    ahead = redis.call('ZRANK', KEYS[5], lease_id)
  else
    -- a ticket of the same millisecond came first: it counts as ahead
    ahead = redis.call('ZCOUNT', KEYS[5], '-inf', score)
  end
end

--#include _wake

-- Wake the first `count` tickets (at most 16 per call), never the caller's own.
local function wake_first(count)
  if count <= 0 then return end
  if count > 16 then count = 16 end
  for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, count - 1)) do
    if id ~= lease_id then wake(KEYS[7], KEYS[8], id, ticket_ttl, now + grace) end
  end
end

if reason ~= 'circuit_open' then
  if wait == 0 and ahead >= slack then
    -- Budget is free, but not for this caller: older tickets first. Wake the ones it is for.
    refuse(math.max(1, (ahead - slack + 1) * unit), 'queued')
    wake_first(math.min(slack, nline))
  elseif wait > 0 and ahead > 0 then
    -- Behind others: its own wait comes after theirs (an estimate, hence "queued").
    wait = wait + ahead * unit
    reason = 'queued'
  end
end

if wait > 0 then
  if join and reason ~= 'circuit_open' then
    if not mine then
      redis.call('ZADD', KEYS[5], score, lease_id)
      nline = nline + 1
    end
    redis.call('ZADD', KEYS[7], now + ticket_ttl, lease_id)
    local keep = ticket_ttl + 1000
    if redis.call('PTTL', KEYS[5]) < keep then
      redis.call('PEXPIRE', KEYS[5], keep)
      redis.call('PEXPIRE', KEYS[7], keep)
    end
  end
  -- Capped so the integer reply can never overflow, whatever a stored value says.
  return {0, math.ceil(math.min(wait, MAX_WAIT_MS)), reason, in_flight, now_s, 0, ahead, nline}
end

if nwin > 0 then
  local hset = {}
  for i = 1, nwin do
    hset[#hset + 1] = fields[i]
    hset[#hset + 1] = string.format('%.3f', new_tats[i])
  end
  redis.call('HSET', KEYS[1], unpack(hset))
  -- A window whose TAT is in the past is a full bucket: the hash may go then.
  redis.call('PEXPIRE', KEYS[1], math.ceil(horizon - now) + 1000)
end

if probe == 1 then
  redis.call('HSET', KEYS[6], 'probe', lease_id, 'probe_until', string.format('%.3f', now + ttl))
end
redis.call('ZADD', KEYS[2], string.format('%.3f', now + ttl), lease_id)
redis.call('HSET', KEYS[3], lease_id, tokens .. ' ' .. now_s .. ' ' .. (in_flight + 1))
-- Only ever extend: a process configured with a shorter lease must not expire the others'.
if redis.call('PTTL', KEYS[2]) < ttl + 1000 then
  redis.call('PEXPIRE', KEYS[2], ttl + 1000)
  redis.call('PEXPIRE', KEYS[3], ttl + 1000)
end
if mine then
  redis.call('ZREM', KEYS[5], lease_id)
  redis.call('ZREM', KEYS[7], lease_id)
  redis.call('DEL', KEYS[8] .. lease_id)
  nline = nline - 1
end
if nline > 0 then
  -- The next in line learns its own wait now (a rate wait is exact), unless it would only
  -- be told "in_flight": then the release that frees a slot wakes it.
  local after = slack - 1
  if after < 1 and (cap == 0 or in_flight + 1 < cap) then after = 1 end
  wake_first(math.min(after, nline))
end
return {1, 0, lease_id, in_flight + 1, now_s, probe, 0, nline}
