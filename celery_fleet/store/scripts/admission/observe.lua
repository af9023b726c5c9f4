-- observe: lower local state to what the provider's rate-limit headers say; never raise it.
--
-- KEYS[1]  ctl      hash   window field -> theoretical arrival time (ms); provider_factor,
--                          provider_factor_until (ms): the provider's limit over the declared
--                          one, trusted for 60 s unless seen again; exp (see _lib/ctl.lua)
-- KEYS[2]  leases   zset   lease -> expiry (ms): says whether the caller's lease is held
-- ARGV[1]  the caller's lease id ("" for none)
-- ARGV[2]  rate factor the provider's own limit implies (its limit / the declared, already
--          bounded to [0.05, 1] by the client; to [0.05, up_to] for a limit with capacity
--          discovery, see _lib/adaptive_discover.lua), or -1
-- ARGV[3]  number of windows n, then n quadruples: field, emission interval T (ms),
--          tolerance tau (ms), units the provider says remain (>= 0)
--
-- A window with R units remaining in our terms has TAT = now + tau - R * T; if ours shows
-- more remaining than the provider's, its TAT moves forward to that (never beyond an empty
-- bucket, now + tau). Everything is computed before the first write.
-- Reply: {windows lowered, held (1: the lease is live; also 1 when no lease was named)}
-- Time unit: ms, Redis TIME.

--#include _lib/ctl

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local held = 1
if ARGV[1] ~= '' then
  local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
  if not (score and score > now) then held = 0 end
end
local factor = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local fields = {}
for i = 1, n do fields[i] = ARGV[4 * i] end
local hset, horizon = {}, now
fields[n + 1] = 'exp'
local tats = redis.call('HMGET', KEYS[1], unpack(fields))
for i = 1, n do
  local emission, tolerance = tonumber(ARGV[4 * i + 1]), tonumber(ARGV[4 * i + 2])
  local remaining = math.max(0, tonumber(ARGV[4 * i + 3]))
  local target = now + tolerance - remaining * emission
  local tat = tonumber(tats[i]) or now
  if target > tat then
    hset[#hset + 1] = fields[i]
    hset[#hset + 1] = string.format('%.3f', target)
    if target > horizon then horizon = target end
  end
end
local lowered = #hset / 2
if factor > 0 then
  hset[#hset + 1] = 'provider_factor'
  hset[#hset + 1] = string.format('%.5f', factor)
  hset[#hset + 1] = 'provider_factor_until'
  hset[#hset + 1] = string.format('%.3f', now + 60000)
end
if #hset > 0 then
  local refresh = ctl_expiry(hset, tonumber(tats[n + 1]), now, horizon)
  redis.call('HSET', KEYS[1], unpack(hset))
  if refresh then redis.call('PEXPIRE', KEYS[1], refresh) end
end
return {lowered, held}
