-- renew: push the expiry of live leases forward (the holder is alive and still working).
--
-- KEYS[1]  leases   zset   lease id -> expiry (ms)
-- KEYS[2]  holders  hash   lease id -> "<reserved tokens> <acquired at ms> <in flight then>"
-- KEYS[3]  breaker  hash   probe, probe_until: a live half-open probe keeps its claim too
-- ARGV[1]  lease TTL (ms)
-- ARGV[2..] lease ids
--
-- A lease that already expired is NOT revived: its slot may have gone to somebody else.
-- Reply: the list of lease ids that were lost. Time unit: milliseconds, Redis TIME.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[1])
local expiry = string.format('%.3f', now + ttl)
local probe = redis.call('HGET', KEYS[3], 'probe')
local lost = {}
for i = 2, #ARGV do
  local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if score and score > now then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
    if probe == ARGV[i] then redis.call('HSET', KEYS[3], 'probe_until', expiry) end
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #lost < #ARGV - 1 and redis.call('PTTL', KEYS[1]) < ttl + 1000 then
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
  redis.call('PEXPIRE', KEYS[2], ttl + 1000)
end
return lost
