-- charge: take from a limit's budgets without refusing, for calls admitted elsewhere.
--
-- A process leaving its local limiter after an outage charges the shared windows with the
-- calls it admitted locally that they would still remember, and enters the local slots it
-- still holds into the in-flight semaphore, so the fleet's next asks are not granted that
-- budget a second time (see fallback.py, LocalLimiter.owed).
--
-- KEYS[1]  ctl     hash  the limit's state (see acquire.lua): window field -> GCRA arrival time
-- KEYS[2]  leases  zset  lease -> expiry (ms): the in-flight semaphore
-- ARGV[1]  n: the number of windows that follow
-- ARGV[2 .. 1+2n]  pairs of window field ("r:60") and how far to move its arrival time (ms)
-- ARGV[2+2n]  the lease TTL (ms)
-- ARGV[3+2n ..]  pairs of a local slot's id and its reserved tokens
--
-- Reply: {windows charged, the lease entered for each slot, in order}. Time unit: ms.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local n = tonumber(ARGV[1])
local charged = 0
for i = 2, 1 + 2 * n, 2 do
  local ms = tonumber(ARGV[i + 1])
  if ms and ms > 0 then
    local tat = tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or now
    if tat < now then tat = now end
    redis.call('HSET', KEYS[1], ARGV[i], tat + ms)
    charged = charged + 1
  end
end
if charged > 0 and redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], 86400000)
end
local reply = {charged}
local ttl = tonumber(ARGV[2 + 2 * n])
local in_flight = redis.call('ZCARD', KEYS[2])
for i = 3 + 2 * n, #ARGV, 2 do
  -- named like acquire.lua's leases: "<acquired µs>.<in flight then>.<tokens>.<id>"
  in_flight = in_flight + 1
  local lease = string.format('%d%06d', t[1], t[2]) .. '.' .. in_flight .. '.' ..
                ARGV[i + 1] .. '.' .. ARGV[i]
  redis.call('ZADD', KEYS[2], now + ttl, lease)
  reply[#reply + 1] = lease
end
if #reply > 1 and redis.call('PTTL', KEYS[2]) < 0 then
  redis.call('PEXPIRE', KEYS[2], math.max(86400000, ttl + 1000))
end
return reply
