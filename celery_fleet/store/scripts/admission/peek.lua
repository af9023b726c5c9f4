-- peek: a limit's state now, for `celery fleet status`; reads only, writes nothing.
--
-- Built from the parts acquire.lua admits with (_lib/gcra, _lib/pause, _lib/adaptive), so
-- what it reports is what an ask would meet: nothing about GCRA is written twice.
--
-- KEYS[1]  ctl      hash   the limit's state (see acquire.lua)
-- KEYS[2]  leases   zset   lease -> expiry (ms); "<acquired µs>.<in flight then>.<tokens>.<id>"
-- KEYS[3]  line     zset   ticket id -> order key: the waiters
-- KEYS[4]  breaker  hash   the limit's circuit breaker (see _lib/breaker.lua)
-- ARGV[1]  how many live leases at most are read to find the oldest
-- ARGV[2]  the limit's constants, as acquire's ARGV[6] (only max_in_flight, the adaptive
--          initial cap, the number of windows, each window's T and tau, and a discovering
--          limit's up_to are read)
-- ARGV[3..2+n] the windows' fields ("r:60", "t:86400")
-- ARGV[3+n] the number L of the limit's lanes (0: no lanes); ARGV[4+n..3+n+L] their
--          priorities, highest first; a lease or ticket of a lane carries "~<priority>"
--          (before a key's "-k<hash>"), one without is in the last lane
-- ARGV[4+n+L] (a limit with keys only) how many of the busiest keys to report;
-- ARGV[5+n+L] the prefix of its keys' Redis keys ("{ns:limit}:k:"): a key's name is read
--           from prefix .. hash .. ":ctl" (same hash tag, so the same slot on Cluster)
--
-- Reply: {now (µs), in flight (live leases), oldest (its acquire time, µs; 0 for none),
--         waiting (tickets in line), the pause still running (ms, text), cap and
--         rate_factor (ctl's own values, "" when absent), the cap in force (0: none),
--         the rate factor in force (text), the breaker's state, opened_at, forced,
--         probe, probe_until, calls, failures ("" when absent), then per window: units
--         admissible now, units a full bucket holds (both at the factor in force)}
-- Last: per lane given, {in flight, waiting}, as one nested array (empty without lanes);
-- in flight counts the live leases read (at most ARGV[1]), waiting is the lane's tickets.
-- A limit with keys adds one last element, a list: per busiest key (most in flight + in
-- line, among the leases scanned and the first 4096 tickets) its hash, its name ("" when
-- its state expired), in flight, in line; the default key (callers without one) is "".
-- A unit is one request ("r:") or one token ("t:"). Time unit: milliseconds, Redis TIME.

--#include _lib/gcra
--#include _lib/pause
--#include _lib/adaptive

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = now_us / 1000
local consts = ARGV[2]
local _, max_in_flight, init_cap, _, _, _, nwin = struct.unpack('<ddddddd', consts)
local win = {struct.unpack('<' .. string.rep('d', 7 + 2 * nwin), consts)}

local up_to = 0
if #consts > 56 + 16 * nwin then up_to = struct.unpack('<d', consts, 57 + 16 * nwin) end
local fields = {'pause_until', 'cap', 'rate_factor', 'provider_factor', 'provider_factor_until'}
for i = 1, nwin do fields[5 + i] = ARGV[2 + i] end
fields[#fields + 1] = 'disc'
fields[#fields + 1] = 'disc_until'
local ctl = redis.call('HMGET', KEYS[1], unpack(fields))

local after_now = string.format('(%.17g', now)  -- live: expiring after now
local live = redis.call('ZRANGEBYSCORE', KEYS[2], after_now, '+inf', 'LIMIT', 0, tonumber(ARGV[1]))
local nlanes = tonumber(ARGV[3 + nwin]) or 0
local lane_held = {}
for i = 1, nlanes do lane_held[ARGV[3 + nwin + i]] = 0 end
local last_lane = ARGV[3 + nwin + nlanes]
local oldest = 0
for _, lease in ipairs(live) do
  local acquired = tonumber(string.match(lease, '^(%d+)'))
  if acquired and (oldest == 0 or acquired < oldest) then oldest = acquired end
  if nlanes > 0 then
    local p = string.match(lease, '~(%d+)$') or string.match(lease, '~(%d+)%-k[^~]*$')
    if not (p and lane_held[p]) then p = last_lane end
    lane_held[p] = lane_held[p] + 1
  end
end
local in_flight = redis.call('ZCOUNT', KEYS[2], after_now, '+inf')

local adaptive_factor = nil
if init_cap > 0 then adaptive_factor = tonumber(ctl[3]) end
local factor
if up_to > 0 then
  factor = discover_factor(adaptive_factor, tonumber(ctl[6 + nwin]), tonumber(ctl[7 + nwin]),
                           tonumber(ctl[4]), tonumber(ctl[5]), now, up_to)
else
  factor = rate_factor(adaptive_factor, tonumber(ctl[4]), tonumber(ctl[5]), now)
end
local reply = {
  now_us, in_flight, oldest, redis.call('ZCARD', KEYS[3]),
  string.format('%.17g', pause_wait(ctl[1], now)), ctl[2] or '', ctl[3] or '',
  cap_in_force(max_in_flight, init_cap, ctl[2]), string.format('%.17g', factor),
}
local b = redis.call('HMGET', KEYS[4], 'state', 'opened_at', 'forced', 'probe', 'probe_until',
                     'calls', 'failures')
for i = 1, 7 do reply[#reply + 1] = b[i] or '' end
for i = 1, nwin do
  local step, tau = win[6 + 2 * i] / factor, win[7 + 2 * i]
  local tat = gcra_check(ctl[5 + i], step, tau, now)
  reply[#reply + 1] = math.max(0, gcra_room(tat, step, tau, now))
  reply[#reply + 1] = math.max(0, math.floor(tau / step))
end
local lanes = {}
for i = 1, nlanes do
  local p = ARGV[3 + nwin + i]
  local from = tonumber(p) * 4398046511104
  lanes[#lanes + 1] = lane_held[p]
  lanes[#lanes + 1] = redis.call('ZCOUNT', KEYS[3], string.format('%.17g', from),
                                 string.format('(%.17g', from + 4398046511104))
end
reply[#reply + 1] = lanes
if ARGV[4 + nwin + nlanes] then
  local most, prefix = tonumber(ARGV[4 + nwin + nlanes]), ARGV[5 + nwin + nlanes]
  local counts, order = {}, {}
  local function count(member, slot)
    local hash = string.match(member, '%-k(%x+)$') or ''
    local c = counts[hash]
    if not c then
      c = {0, 0}
      counts[hash] = c
      order[#order + 1] = hash
    end
    c[slot] = c[slot] + 1
  end
  for _, lease in ipairs(live) do count(lease, 1) end
  for _, ticket in ipairs(redis.call('ZRANGE', KEYS[3], 0, 4095)) do count(ticket, 2) end
  table.sort(order, function(a, b)
    local x, y = counts[a], counts[b]
    if x[1] + x[2] ~= y[1] + y[2] then return x[1] + x[2] > y[1] + y[2] end
    return a < b
  end)
  local keys = {}
  for i = 1, math.min(most, #order) do
    local hash = order[i]
    local name = ''
    if hash ~= '' then name = redis.call('HGET', prefix .. hash .. ':ctl', 'name') or '' end
    for _, x in ipairs({hash, name, counts[hash][1], counts[hash][2]}) do keys[#keys + 1] = x end
  end
  reply[#reply + 1] = keys
end
return reply
