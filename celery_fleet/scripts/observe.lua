-- observe: lower local state to what the provider's rate-limit headers say; never raise it.
--
-- KEYS[1]  gcra     hash   window field -> theoretical arrival time (ms)
-- KEYS[2]  ctl      hash   provider_factor, provider_factor_until (ms): the provider's limit
--                          over the declared one, trusted for 60 s unless seen again
-- ARGV[1]  rate factor the provider's own limit implies (its limit / the declared), or -1
-- ARGV[2]  number of windows n, then n quadruples: field, emission interval T (ms),
--          tolerance tau (ms), units the provider says remain
--
-- A window with R units remaining in our terms has TAT = now + tau - R * T; if ours shows
-- more remaining than the provider's, its TAT moves forward to that. Time unit: ms, Redis TIME.
-- Reply: the number of windows lowered.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local lowered = 0
local factor = tonumber(ARGV[1])
if factor > 0 then
  redis.call('HSET', KEYS[2], 'provider_factor', string.format('%.5f', factor),
             'provider_factor_until', string.format('%.3f', now + 60000))
end
local horizon = now
for i = 1, tonumber(ARGV[2]) do
  local field = ARGV[4 * i - 1]
  local emission, tolerance = tonumber(ARGV[4 * i]), tonumber(ARGV[4 * i + 1])
  local remaining = tonumber(ARGV[4 * i + 2])
  local target = now + tolerance - remaining * emission
  local tat = tonumber(redis.call('HGET', KEYS[1], field)) or now
  if target > tat then
    redis.call('HSET', KEYS[1], field, string.format('%.3f', target))
    lowered = lowered + 1
    if target > horizon then horizon = target end
  end
end
if lowered > 0 then
  local need = math.ceil(horizon - now) + 1000
  if redis.call('PTTL', KEYS[1]) < need then redis.call('PEXPIRE', KEYS[1], need) end
end
return lowered
