-- renew: push the expiry of live leases forward (the holder is alive and still working),
-- and re-assert leases that Redis forgot.
--
-- KEYS[1]  leases   zset   lease -> expiry (ms); a lease carries its own record (acquire.lua)
-- KEYS[2]  settled  hash   lease -> tokens it was settled to
-- KEYS[3]  breaker  hash   probe, probe_until: a live half-open probe keeps its claim too
-- KEYS[4]  ctl      hash   cap: the adaptive in-flight cap
-- KEYS[5]  key leases zset  (only for leases of one key with its own in-flight cap, see
--                          _lib/keys.lua): renewed and restored there too, lost ones dropped
-- ARGV[1]  lease TTL (ms)
-- ARGV[2]  max_in_flight (0 = no cap)
-- ARGV[3]  adaptive initial cap (0 = not adaptive: ctl.cap is ignored)
-- ARGV[4..] pairs: lease, tokens it holds now (after any settle)
--
-- The client only sends leases it renewed within their TTL by its own clock, so a lease
-- that is missing here was not taken by expiry: Redis lost it (restarted empty, flushed,
-- failed over to a replica that never saw it, evicted). It is put back while the cap has
-- room, so the semaphore is rebuilt within one renewal period. A lease whose expiry has
-- passed, or that finds the cap full, is NOT revived: its slot may have gone to somebody
-- else.
-- Reply: {lost lease ids..., "+", restored lease ids...}. Time unit: ms, Redis TIME.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[1])
local max_in_flight, init_cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local now_s = string.format('%.3f', now)
local expiry = string.format('%.3f', now + ttl)
local cap = max_in_flight
if init_cap > 0 then
  local ctl_cap = math.max(1, math.floor(tonumber(redis.call('HGET', KEYS[4], 'cap')) or init_cap))
  if cap == 0 or ctl_cap < cap then cap = ctl_cap end
end
local live = redis.call('ZCOUNT', KEYS[1], '(' .. now_s, '+inf')
local probe = redis.call('HGET', KEYS[3], 'probe')
local lost, restored = {}, {}
for i = 4, #ARGV, 2 do
  local id, tokens = ARGV[i], ARGV[i + 1]
  local score = tonumber(redis.call('ZSCORE', KEYS[1], id))
  if score and score > now then
    redis.call('ZADD', KEYS[1], 'XX', expiry, id)
    if probe == id then redis.call('HSET', KEYS[3], 'probe_until', expiry) end
  elseif not score and (cap == 0 or live < cap) then
    live = live + 1
    redis.call('ZADD', KEYS[1], expiry, id)
    if string.match(id, '^%d+%.%d+%.(%d+)%.') ~= tokens then
      redis.call('HSET', KEYS[2], id, tokens)
    end
    restored[#restored + 1] = id
  else
    lost[#lost + 1] = id
  end
end
-- The keys live at least a day (see acquire.lua) and at least as long as a live lease.
local keep = math.max(86400000, ttl + 1000)
if #lost < (#ARGV - 3) / 2 and redis.call('PTTL', KEYS[1]) < keep / 2 then
  redis.call('PEXPIRE', KEYS[1], keep)
  if redis.call('PTTL', KEYS[2]) >= 0 then redis.call('PEXPIRE', KEYS[2], keep) end
end
if KEYS[5] then
  for _, id in ipairs(lost) do redis.call('ZREM', KEYS[5], id) end
  for i = 4, #ARGV, 2 do
    local id = ARGV[i]
    if redis.call('ZSCORE', KEYS[1], id) then redis.call('ZADD', KEYS[5], expiry, id) end
  end
  redis.call('PEXPIRE', KEYS[5], ttl + 1000)
end
lost[#lost + 1] = '+'
for _, id in ipairs(restored) do lost[#lost + 1] = id end
return lost
