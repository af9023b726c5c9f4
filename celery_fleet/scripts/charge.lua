-- charge: take from a limit's buckets without refusing, for calls admitted elsewhere.
--
-- A process leaving its local limiter after an outage charges the shared windows with the
-- calls it admitted locally that they would still remember, so the fleet's next asks are
-- not granted that budget a second time (see fallback.py, LocalLimiter.owed).
--
-- KEYS[1]  ctl  hash  the limit's state (see acquire.lua): window field -> GCRA arrival time
-- ARGV     pairs of window field ("r:60") and how far to move its arrival time (ms, >= 0)
--
-- Reply: how many windows were charged. Time unit: milliseconds.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local n = 0
for i = 1, #ARGV, 2 do
  local ms = tonumber(ARGV[i + 1])
  if ms and ms > 0 then
    local tat = tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or now
    if tat < now then tat = now end
    redis.call('HSET', KEYS[1], ARGV[i], tat + ms)
    n = n + 1
  end
end
if n > 0 and redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], 86400000)
end
return n
