-- acquire: admit one call against every budget of a limit, all or nothing, in ticket order.
--
-- KEYS[1]  ctl      hash   the limit's state, read in one HMGET on every admission:
--                          window fields ("r:60", "t:86400") -> GCRA theoretical arrival
--                          time (ms); pause_until (ms); cap (adaptive in-flight cap, float);
--                          rate_factor (adaptive, 0..1); provider_factor (0..1, from
--                          rate-limit headers) until provider_factor_until (ms); hold_ms
--                          (sampled EWMA); line_until (ms: the line may be non-empty until
--                          then); exp (ms: when the hash's TTL runs out, refreshed twice a day)
-- KEYS[2]  leases   zset   lease -> expiry (ms); the in-flight semaphore. A lease names its own
--                          record: "<acquired µs>.<in flight then>.<tokens>.<id>"
-- KEYS[3]  line     zset   ticket id -> order key (lane * 2^42 + first-asked ms): the waiters
-- KEYS[4]  breaker  hash   state ("open"), opened_at, forced ("open"/"closed"), probe, probe_until
-- KEYS[5]  waiting  zset   ticket id -> expiry (ms): a ticket is a lease on a place in line
-- KEYS[6]  wake     prefix of the per-process wake-up lists: KEYS[6] .. the ticket's first
--                    8 characters (its process's tag, see _lib/line.lua). The lists share the
--                    limit's hash tag (so the slot is KEYS[6]'s); which one to push to is
--                    only known in here, hence a prefix rather than a full key.
-- KEYS[7]  settled  hash   lease -> tokens it was settled to (only leases settled so far)
-- ARGV[1]  id: the caller's ticket while it waits, and the last part of its lease
-- ARGV[2]  tokens this call reserves (cost in every "t:" window; "r:" windows cost 1)
-- ARGV[3]  order: first-asked time (ms, Redis clock; 0 = now), the caller's age in line
-- ARGV[4]  join: 1 = a refused caller takes (or keeps) a ticket; 0 = ask once, no ticket;
--          3 and 2 are the same asked again after the connection dropped under the first
--          ask: if that one admitted (a lease "<record>.<id>" is held), its lease is the
--          answer, so a resend never charges twice; 4 only looks that lease up (an ask
--          cancelled in flight): its lease, or a refusal ("gone") that changes nothing.
--          "0|<lease>" and "1|<lease>": the same, with the release of one of this limit's
--          leases riding in front (the process's last release, folded into its next ask:
--          one EVALSHA for both, issue 26). It runs first, exactly as release_lean.lua
--          would (ZREM, and the line's first waiter woken when someone waits); when that
--          lease had already expired the reply is {"lost", <the reply>}.
-- ARGV[5]  lane: "<priority>" (a lane that may use every budget; "0" on a limit without
--          lanes) or "<priority>:<usable share>[:<guarantee>]", then "|<q>:<g>" per lane
--          below with a guarantee (_lib/lanes.lua; admission/lanes.py). The priority is the
--          first term of the line's order key; the share caps what this lane and the lanes
--          below hold in flight together at max(1, floor(cap * share)) and cuts each
--          window's tolerance to max(tau * share, min(step, tau)) (never below one call).
--          A lane owed its guarantee (_lib/lanes.lua) passes the tickets of the lanes
--          above and spends the window's whole tolerance; the lanes above leave it that.
-- ARGV[6]  the limit's constants as little-endian doubles (struct.unpack: one call instead of
--          a tonumber per argument): lease TTL (ms); max_in_flight (0 = no cap); adaptive
--          initial cap (0 = not adaptive: ctl.cap and rate_factor are ignored); breaker reset
--          timeout (ms; 0 = no breaker); ticket TTL (ms: a waiter that stops asking loses
--          its ticket after this); wake grace (ms: a woken ticket that does not ask within
--          this is dropped); the number of windows n; then per window its emission interval
--          T (ms) and tolerance tau (ms); then, only for a limit with capacity discovery,
--          up_to (the most the rate factor may reach: ctl's disc, see
--          _lib/adaptive_discover.lua; such a limit also marks ctl's disc_hit when a window
--          refuses, at most every 200 ms)
-- ARGV[7..6+n] the windows' fields ("r:60", "t:86400")
--
-- A limit with keys (tenants: "keys" or "weights" in its configuration, see _lib/keys.lua)
-- sends two more KEYS and, after the window fields, the key's arguments:
-- KEYS[8]  key ctl     hash   the key's window arrival times, vf, exp, name
-- KEYS[9]  key leases  zset   lease -> expiry (ms): the key's own in-flight semaphore
-- ARGV[7+n]  the key's constants as doubles: sub (1 = its own budgets apply), weight,
--            max_in_flight (0 = none), keep (ms), the number of windows k, then per
--            window T and tau
-- ARGV[8+n..7+n+k] the key's window fields; ARGV[8+n+k] the key as written (its name)
-- The line's order key is then lane * 2^42 + the ticket's virtual start tag (fair share)
-- instead of its first-asked ms, and the limit's ctl holds vt (the virtual time). ARGV[3]
-- (order) then carries a place kept from an earlier ticket of the same call (a
-- reschedule): 1 + its start tag * 1024, 0 for none; a refusal's 6th element is the
-- ticket's start tag (text) when it holds (or keeps) a place, else 0.
--
-- Reply: lease                                                    admitted, no probe, nobody
--                                                                  in line: the common case;
--                                                                  in_flight and now are the
--                                                                  lease's first two fields
--        {1, 0, lease, in_flight, now, probe, 0, line}             admitted (probe=1: half-open)
--        {0, wait_ms, reason, in_flight, now, 0, ahead, line}     refused, nothing consumed
-- reason: "circuit_open", "paused", "in_flight", "key_in_flight" (the key's own cap),
-- "key:" .. a key window's field, "queued" (a budget is free but older tickets
-- come first) or the refusing window's field. ahead: tickets before the caller's place; line:
-- tickets waiting. wait_ms is an integer (ceil), an estimate for "in_flight" and "queued";
-- now is Redis TIME in microseconds (an integer). The lone lease is one bulk string where
-- the array was eight elements for Redis to build and the client to parse (issue 26;
-- admission/decision.py's read_acquire reads both). Time unit: milliseconds.
--
-- Cost: the admitted path with nobody waiting and no breaker is TIME, one HMGET, ZCARD,
-- HSET, ZADD. Expired leases are swept only when they could matter (the cap is reached, or
-- a cap-less limit holds many), and TTLs are refreshed only when due.
--
-- Read one part at a time: the breaker (_lib/breaker.lua), the windows (_lib/gcra.lua),
-- the pause (_lib/pause.lua), the cap in force (_lib/adaptive.lua), the wake-ups of the
-- line (_lib/line.lua) and the ctl hash's TTL (_lib/ctl.lua); the order of the checks
-- and the line are here.

--#include _lib/gcra
--#include _lib/pause
--#include _lib/adaptive
--#include _lib/line
--#include _lib/ctl
--#include _lib/keys
--#include _lib/lanes

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = now_us / 1000
local id = ARGV[1]
local tokens = tonumber(ARGV[2])
local since = tonumber(ARGV[3])
local kept = since  -- a keyed limit: 1 + a kept start tag * 1024 (0: none)
local mode = ARGV[4]
local rider = nil  -- the lease of a release riding in front (run once ctl is read)
local lost = false  -- that lease had already expired
if #mode > 1 then
  rider = string.sub(mode, 3)
  mode = string.sub(mode, 1, 1)
end
local join = mode == '1' or mode == '3'
if mode == '2' or mode == '3' or mode == '4' then
  -- Its lease is "<µs>.<n>.<tokens>.<id>": the id must be all that follows the record.
  -- A local slot entered at a hand-over (charge.lua) is "<µs>.<n>.<tokens>.local.<id>",
  -- held by the caller that was admitted locally: never the answer to this ask.
  local suffix = '.' .. id
  for _, held in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if string.sub(held, -#suffix) == suffix
        and string.find(string.sub(held, 1, -#id - 1), '^%d+%.%d+%.%d+%.$') then
      local probe = 0
      if redis.call('HGET', KEYS[4], 'probe') == held then probe = 1 end
      return {1, 0, held, redis.call('ZCARD', KEYS[2]), now_us, probe, 0, 0}
    end
  end
  if mode == '4' then return {0, 0, 'gone', redis.call('ZCARD', KEYS[2]), now_us, 0, 0, 0} end
end
local lane, share, guar, below = lane_arg(ARGV[5])
local consts = ARGV[6]
local ttl, max_in_flight, init_cap, reset_ms, ticket_ttl, grace, nwin =
  struct.unpack('<ddddddd', consts)
-- Capacity discovery: only a limit with it sends up_to after the windows (the rest pay
-- this length check and nothing else).
local up_to = 0
if #consts > 56 + 16 * nwin then up_to = struct.unpack('<d', consts, 57 + 16 * nwin) end
local MAX_WAIT_MS = 2 ^ 50
local BIG = 2 ^ 50
-- A cap-less limit sweeps expired leases once it holds this many (a capped one at its cap).
local SWEEP_AT = 1024

local wait = 0
local reason = ''
local function refuse(ms, why)
  if ms > wait then wait = ms; reason = why end
end

-- Circuit breaker: open refuses until reset; past it exactly one caller (a lease) probes.
local probe = 0
if reset_ms > 0 then
  -- _lib/breaker's function is made here, for a limit with a breaker only (a closure costs)
--#include _lib/breaker
  local shut
  shut, probe = breaker_gate(KEYS[4], reset_ms, now)
  if shut > 0 then refuse(shut, 'circuit_open') end
end

-- One read of all the state: the fixed fields, then each window's arrival time. Fields
-- only an adaptive limit, or a capped one, uses are read only by those (each costs).
local fields = {'pause_until', 'provider_factor', 'provider_factor_until', 'line_until', 'exp'}
local I_CAP, I_RATE, I_HOLD = 0, 0, 0
if init_cap > 0 then
  fields[#fields + 1] = 'cap'; I_CAP = #fields
  fields[#fields + 1] = 'rate_factor'; I_RATE = #fields
end
if init_cap > 0 or max_in_flight > 0 then
  fields[#fields + 1] = 'hold_ms'; I_HOLD = #fields
end
local I_DISC = 0
if up_to > 0 then
  fields[#fields + 1] = 'disc'; I_DISC = #fields
  fields[#fields + 1] = 'disc_until'
  fields[#fields + 1] = 'disc_hit'
end
local keyed = #KEYS > 7
local I_VT = 0
-- fair share runs per lane (each lane is its own queue, served in lane order): a lane's
-- virtual time and a key's finish tag in it are their own fields ("vt"/"vf" for lane 0).
-- One virtual time for all lanes let a key's interactive call, tagged behind its long
-- batch queue, move batch's virtual time past that queue: every other key's batch
-- tickets then went behind it.
local VT, VF = 'vt', 'vf'
if lane > 0 then VT, VF = 'vt' .. lane, 'vf' .. lane end
if keyed then fields[#fields + 1] = VT; I_VT = #fields end
local NFIXED = #fields
for i = 1, nwin do fields[NFIXED + i] = ARGV[6 + i] end
-- a lane with a guarantee: its guarantee clock per window (_lib/lanes.lua) follows
if guar > 0 then
  for i = 1, nwin do fields[NFIXED + nwin + i] = 'g' .. lane .. ':' .. ARGV[6 + i] end
end
local ctl = redis.call('HMGET', KEYS[1], unpack(fields))
if rider then
  -- The release riding in front, as release_lean.lua runs it: the lease leaves, and
  -- when the line may hold someone (line_until, where release_lean asks EXISTS) the
  -- first waiter is woken. Before anything is counted: this ask sees the slot free.
  if redis.call('ZREM', KEYS[2], rider) == 0 then
    lost = true
  elseif (tonumber(ctl[4]) or 0) > now then
    wake_next(KEYS[3], KEYS[2], KEYS[5], KEYS[6], now, max_in_flight, ticket_ttl, grace)
  end
end
-- each window's emission interval and tolerance, from the constants
local win = {struct.unpack('<' .. string.rep('d', 7 + 2 * nwin), consts)}
local paused = pause_wait(ctl[1], now)
if paused > 0 then refuse(paused, 'paused') end

-- slack: how many calls like this one could pass right now; unit: the time one call's worth
-- of the binding budget takes to come back (to estimate waits in line).
local slack, unit = BIG, 0
local in_flight = redis.call('ZCARD', KEYS[2])
local cap = cap_in_force(max_in_flight, init_cap, ctl[I_CAP])
-- leases per lane, read once and only when a lane's share or guarantee needs it (a
-- caller in no lane needs neither: _lib/lanes.lua made lane_census only for lanes)
local census, lanes_held = nil, nil
if lane_census then lanes_held = function()
  if not census then census = lane_census(KEYS[2], now) end
  return census
end end
-- A lower lane and the ones below it may hold only its share of the cap together: the
-- rest is kept for the lanes above.
local lane_cap = cap
if share < 1 and cap > 0 then lane_cap = math.max(1, math.floor(cap * share)) end
if (cap > 0 and in_flight >= lane_cap) or in_flight >= SWEEP_AT then
  -- A holder killed with SIGKILL never releases: its lease simply expires here.
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 256)
  if #expired > 0 then
    redis.call('ZREM', KEYS[2], unpack(expired))
    redis.call('HDEL', KEYS[7], unpack(expired))
    in_flight = in_flight - #expired
  end
end
if cap > 0 then
  -- Nobody knows when a holder finishes: estimate from the mean hold time, never
  -- later than the first lease expiry, never a busy loop.
  unit = math.max(1, (tonumber(ctl[I_HOLD]) or 200) / cap)
  slack = lane_cap - in_flight
  if slack <= 0 and lane_cap < cap and in_flight < cap then
    -- past its share of the total, but the lanes above hold part of that
    slack = math.min(cap - in_flight, lane_cap - held_from(lanes_held(), lane))
  end
  if slack <= 0 then
    local hint = math.max(5, unit)
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if first[2] then hint = math.min(hint, math.max(1, tonumber(first[2]) - now)) end
    refuse(hint, 'in_flight')
  end
end

-- line_until says when the last ticket expires at the latest: before it, nobody waits.
local nline = 0
if (tonumber(ctl[4]) or 0) > now then
  nline = redis.call('ZCARD', KEYS[3])
  if nline > 0 then
    if line_sweep(KEYS[3], KEYS[5], now, 64) > 0 then nline = redis.call('ZCARD', KEYS[3]) end
  end
end
-- A lane with a guarantee, when others wait: is it owed (_lib/lanes.lua)?
local owed = false
if guar > 0 and nline > 0 then
  local clocks = {}
  for i = 1, nwin do clocks[i] = ctl[NFIXED + nwin + i] end
  owed = lane_owed(lanes_held()[lane] or 0, cap, guar, clocks, now)
end

-- The rate factor stretches every window (adaptive, or the provider's headers).
local adaptive_factor = nil
if init_cap > 0 then adaptive_factor = tonumber(ctl[I_RATE]) end
local factor
if up_to > 0 then
  factor = discover_factor(adaptive_factor, tonumber(ctl[I_DISC]), tonumber(ctl[I_DISC + 1]),
                           tonumber(ctl[2]), tonumber(ctl[3]), now, up_to)
else
  factor = rate_factor(adaptive_factor, tonumber(ctl[2]), tonumber(ctl[3]), now)
end
local binding = false  -- a window refused (discovery: the ceiling binds)
local new_tats = {}
local steps = {}
local horizon = now
for i = 1, nwin do
  local field = fields[NFIXED + i]
  local emission = win[6 + 2 * i] / factor
  local tolerance = win[7 + 2 * i]
  local cost = 1
  if string.sub(field, 1, 1) == 't' then cost = tokens end
  local step = cost * emission
  steps[i] = step
  -- A lower lane may spend only its share of the burst, but always one call's worth
  -- (all of it while it is owed its guarantee).
  if share < 1 and not owed then tolerance = math.max(tolerance * share, math.min(step, tolerance)) end
  local tat, over = gcra_check(ctl[NFIXED + i], step, tolerance, now)
  if over > 0 then
    refuse(over, field)
    if ctl[NFIXED + i] then binding = true end
    new_tats[i] = tat
  else
    new_tats[i] = tat + step
    -- at least 1: this call fits (rounding must not turn "fits" into "queued")
    if step > 0 then
      slack = math.min(slack, math.max(1, gcra_room(tat, step, tolerance, now)))
    end
  end
  if step > unit then unit = step end
  if new_tats[i] > horizon then horizon = new_tats[i] end
end

-- The key's own budgets (_lib/keys.lua), checked like the limit's: all or nothing.
local kweight, kcap, kkeep, knwin, kwin, kstate, kin = 1, 0, 0, 0, nil, nil, 0
local kfields, new_ktats, khorizon = nil, nil, now
local kwait, kreason = 0, ''
if keyed then
  local _
  _, kweight, kcap, kkeep, knwin, kwin = key_consts(ARGV[7 + nwin])
  kfields, new_ktats = {VF, 'exp'}, {}
  for i = 1, knwin do kfields[2 + i] = ARGV[7 + nwin + i] end
  kstate = redis.call('HMGET', KEYS[8], unpack(kfields))
  if kcap > 0 then
    kin = redis.call('ZCARD', KEYS[9])
    if kin >= kcap then
      local expired = redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now, 'LIMIT', 0, 256)
      if #expired > 0 then
        redis.call('ZREM', KEYS[9], unpack(expired))
        kin = kin - #expired
      end
    end
    if kin >= kcap then
      local hint = math.max(5, (tonumber(ctl[I_HOLD]) or 200) / kcap)
      local first = redis.call('ZRANGE', KEYS[9], 0, 0, 'WITHSCORES')
      if first[2] then hint = math.min(hint, math.max(1, tonumber(first[2]) - now)) end
      kwait, kreason = hint, 'key_in_flight'
    end
  end
  for i = 1, knwin do
    local field = kfields[2 + i]
    local cost = 1
    if string.sub(field, 1, 1) == 't' then cost = tokens end
    local step = cost * kwin[4 + 2 * i]
    local tat, over = gcra_check(kstate[2 + i], step, kwin[5 + 2 * i], now)
    if over > kwait then kwait, kreason = over, 'key:' .. field end
    new_ktats[i] = tat
    if over == 0 then new_ktats[i] = tat + step end
    if new_ktats[i] > khorizon then khorizon = new_ktats[i] end
  end
end

-- key_write(kset, horizon, keep): write the key's ctl (a new key also gets its name) and
-- refresh its TTL when due.
local key_write = nil
if keyed then key_write = function(kset, horizon, keep)
  local exp = tonumber(kstate[2])
  if not exp then
    kset[#kset + 1] = 'name'
    kset[#kset + 1] = ARGV[8 + nwin + knwin]
  end
  local refresh = key_expiry(kset, exp, now, horizon, keep)
  if #kset > 0 then redis.call('HSET', KEYS[8], unpack(kset)) end
  if refresh then redis.call('PEXPIRE', KEYS[8], refresh) end
end end

-- The line: callers refused before wait in order of (lane, age); nobody passes an older
-- ticket of its own lane or any ticket of a lane above (their order keys are smaller),
-- while a caller passes every ticket of the lanes below; a lane owed its guarantee
-- passes those of the lanes above too (_lib/lanes.lua).
local mine = nil
local ahead = 0
local higher = 0  -- tickets of the lanes above the caller's: it never goes before them
if since <= 0 then since = now end
local score = lane * 4398046511104 + math.floor(since)
local tag = 0
if keyed then
  -- fair share: the order inside a lane is the ticket's virtual start tag, not its age
  tag = key_tag(tonumber(ctl[I_VT]) or 1, tonumber(kstate[1]) or 0)
  if kept > 0 and (kept - 1) / 1024 < tag then
    -- the same call asks again with a new ticket (a reschedule): its old place, and its
    -- key's next ticket does not move on for it (it already did when the place was taken)
    tag = (kept - 1) / 1024
  else
    kept = 0
  end
  score = lane * 4398046511104 + tag
end
if nline > 0 then
  mine = redis.call('ZSCORE', KEYS[3], id)
  if mine then
    ahead = redis.call('ZRANK', KEYS[3], id)
  else
    -- a ticket of the same millisecond came first: it counts as ahead
    ahead = redis.call('ZCOUNT', KEYS[3], '-inf', score)
  end
  if lane > 0 and ahead > 0 then
    higher = redis.call('ZCOUNT', KEYS[3], '-inf',
                        string.format('(%.17g', lane * 4398046511104))
    if owed then
      ahead = ahead - higher
      higher = 0
    end
  end
end

-- The lanes below that wait and are owed their guarantee: their first tickets (as many
-- as they are owed slots, at most 16 a lane: woken together, tickets whose holders died
-- are all dropped after one wake grace, not one grace each while this lane waits), and
-- the slots they are owed (only asked when budget is free for this caller and others wait).
-- This and wake_first are made only when others wait (a closure costs on every call).
local owed_below, wake_first
if below and nline > 0 then owed_below = function()
  local heads, need = {}, 0
  for q, g in string.gmatch(below, '(%d+):([^|]+)') do
    q, g = tonumber(q), tonumber(g)
    local lo = q * LANE_SPAN
    local hi = string.format('(%.17g', lo + LANE_SPAN)
    local first = redis.call('ZRANGEBYSCORE', KEYS[3], lo, hi, 'LIMIT', 0, 1)
    if first[1] and first[1] ~= id then
      local clocks = {}
      if nwin > 0 then
        local names = {}
        for i = 1, nwin do names[i] = 'g' .. q .. ':' .. fields[NFIXED + i] end
        clocks = redis.call('HMGET', KEYS[1], unpack(names))
      end
      local held = lanes_held()[q] or 0
      if lane_owed(held, cap, g, clocks, now) then
        local n = redis.call('ZCOUNT', KEYS[3], lo, hi)
        if cap > 0 then n = math.min(n, math.floor(cap * g) - held) end
        need = need + n
        local woken = first
        if n > 1 then
          woken = redis.call('ZRANGEBYSCORE', KEYS[3], lo, hi, 'LIMIT', 0, math.min(n, 16))
        end
        for _, ticket in ipairs(woken) do
          if ticket ~= id then heads[#heads + 1] = ticket end
        end
      end
    end
  end
  return heads, need
end end

-- Wake the first `count` tickets (at most 16 per call), never the caller's own.
if nline > 0 then wake_first = function(count)
  if count <= 0 then return end
  if count > 16 then count = 16 end
  for _, ticket in ipairs(redis.call('ZRANGE', KEYS[3], 0, count - 1)) do
    if ticket ~= id then wake(KEYS[5], KEYS[6], ticket, ticket_ttl, now + grace) end
  end
end end

if mine and keyed then tag = tonumber(mine) - lane * 4398046511104 end
-- the place a refused keyed ticket holds, for the caller to keep (0: none)
local place = 0
if keyed and (mine or kept > 0) then place = string.format('%.17g', tag) end

if kwait > 0 and reason ~= 'circuit_open' then
  -- Refused by its key's own budget (nothing consumed): it holds no place in the limit's
  -- line meanwhile, so a key at its own limit never holds up the other keys.
  if mine then
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[5], id)
    nline = nline - 1
    if wait == 0 then wake_first(math.min(slack, nline)) end
  end
  local r = {0, math.ceil(math.min(kwait, MAX_WAIT_MS)), kreason, in_flight, now_us, place, 0, nline}
  if lost then return {'lost', r} end
  return r
end

if reason ~= 'circuit_open' then
  if wait == 0 and (ahead >= slack or higher > 0) then
    -- Budget is free, but not for this caller: older tickets first, and a higher lane's
    -- ticket before any lower caller, even one that would fit beside it (else small
    -- batch calls could keep a large interactive one waiting). Wake the ones it is for.
    refuse(math.max(1, (ahead - slack + 1) * unit), 'queued')
    if nline > 0 then wake_first(math.min(slack, nline)) end
  elseif wait == 0 and below and nline > 0 then
    -- A lane below is owed its guarantee: leave it what it is owed (every window's next
    -- call: a window's share cannot be counted out per lane) and wake it.
    local heads, need = owed_below()
    if #heads > 0 and (nwin > 0 or slack <= need) then
      refuse(math.max(1, unit), 'queued')
      for _, ticket in ipairs(heads) do
        wake(KEYS[5], KEYS[6], ticket, ticket_ttl, now + grace)
      end
    end
  elseif wait > 0 and ahead > 0 then
    -- Behind others: its own wait comes after theirs (an estimate, hence "queued").
    wait = wait + ahead * unit
    reason = 'queued'
  end
end

if wait > 0 then
  if binding and up_to > 0 and (tonumber(ctl[I_DISC + 2]) or 0) < now - 200 then
    -- ctl exists (a window's arrival time is in it), so it keeps its TTL
    redis.call('HSET', KEYS[1], 'disc_hit', string.format('%.3f', now))
  end
  if join and reason ~= 'circuit_open' then
    if not mine then
      redis.call('ZADD', KEYS[3], score, id)
      nline = nline + 1
    end
    if keyed then
      -- its key's next ticket starts after this one; the key lives while it waits
      local kset = {}
      if not mine and kept == 0 then kset = {VF, string.format('%.17g', tag + 1 / kweight)} end
      place = string.format('%.17g', tag)
      key_write(kset, now, math.max(kkeep, ticket_ttl + 1000))
    end
    redis.call('ZADD', KEYS[5], now + ticket_ttl, id)
    local keep = ticket_ttl + 1000
    local line_until = math.max(tonumber(ctl[4]) or 0, now + keep)
    local hset = {'line_until', line_until}
    local refresh = ctl_expiry(hset, tonumber(ctl[5]), now, line_until)
    redis.call('HSET', KEYS[1], unpack(hset))
    if refresh then redis.call('PEXPIRE', KEYS[1], refresh) end
    if redis.call('PTTL', KEYS[3]) < keep then
      redis.call('PEXPIRE', KEYS[3], keep)
      redis.call('PEXPIRE', KEYS[5], keep)
    end
  end
  -- Capped so the integer reply can never overflow, whatever a stored value says.
  local r = {0, math.ceil(math.min(wait, MAX_WAIT_MS)), reason, in_flight, now_us, place, ahead, nline}
  if lost then return {'lost', r} end
  return r
end

local hset = {}
for i = 1, nwin do
  hset[#hset + 1] = fields[NFIXED + i]
  hset[#hset + 1] = new_tats[i]  -- a Lua number goes to Redis as %.17g: exact
end
if guar > 0 then
  -- this lane's guarantee clocks move by what it spends, at its guaranteed rate; one
  -- that fell behind keeps the window's burst (its tolerance) of credit: so the lane is
  -- owed its share of a burst too (from idle, guar of what the bucket holds), and the
  -- round trip or two of the wake-up that lets an owed lane in is not lost on every call
  for i = 1, nwin do
    local credit = win[7 + 2 * i]
    local clock = tonumber(ctl[NFIXED + nwin + i]) or (now - credit)
    if clock < now - credit then clock = now - credit end
    hset[#hset + 1] = fields[NFIXED + nwin + i]
    hset[#hset + 1] = clock + steps[i] / guar
  end
end
if keyed then
  -- the virtual time moves to the start tag of the ticket admitted (never back)
  local vt = tonumber(ctl[I_VT]) or 1
  if tag > vt then vt = tag end
  hset[#hset + 1] = VT
  hset[#hset + 1] = string.format('%.17g', vt)
end
local refresh = ctl_expiry(hset, tonumber(ctl[5]), now, horizon)
if #hset > 0 then redis.call('HSET', KEYS[1], unpack(hset)) end
if refresh then redis.call('PEXPIRE', KEYS[1], refresh) end

-- The lease carries its own record, first (parsed from the start, without backtracking):
-- when it was acquired (µs: AIMD compares it with the last cut, which may be in the same
-- ms), how many were in flight then, the tokens it reserved.
-- Built from the strings TIME answered: no number is parsed or printed for it but the count.
local lease = t[1] .. string.rep('0', 6 - #t[2]) .. t[2] .. '.' ..
              string.format('%d', in_flight + 1) .. '.' .. ARGV[2] .. '.' .. id
if probe == 1 then
  redis.call('HSET', KEYS[4], 'probe', lease, 'probe_until', now + ttl)
end
redis.call('ZADD', KEYS[2], now + ttl, lease)
-- An empty zset is deleted, so in_flight 0 means a new key: give it a TTL (a day, or the
-- lease TTL if longer), refreshed with the state's. Releases and sweeps empty it.
if in_flight == 0 or refresh then
  redis.call('PEXPIRE', KEYS[2], math.max(86400000, ttl + 1000))
end
if keyed then
  local kset = {}
  for i = 1, knwin do
    kset[#kset + 1] = kfields[2 + i]
    kset[#kset + 1] = new_ktats[i]
  end
  if not mine and kept == 0 then
    kset[#kset + 1] = VF
    kset[#kset + 1] = string.format('%.17g', tag + 1 / kweight)
  end
  key_write(kset, khorizon, kkeep)
  if kcap > 0 then
    redis.call('ZADD', KEYS[9], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[9], ttl + 1000)
  end
end
if mine then
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[5], id)
  redis.call('LREM', wake_list(KEYS[6], id), 0, id)
  nline = nline - 1
end
if nline > 0 then
  -- The next in line learns its own wait now (a rate wait is exact), unless it would only
  -- be told "in_flight": then the release that frees a slot wakes it.
  local after = slack - 1
  if after < 1 and (cap == 0 or in_flight + 1 < cap) then after = 1 end
  wake_first(math.min(after, nline))
end
local r = lease
if probe == 1 or nline > 0 then r = {1, 0, lease, in_flight + 1, now_us, probe, 0, nline} end
if lost then return {'lost', r} end
return r
