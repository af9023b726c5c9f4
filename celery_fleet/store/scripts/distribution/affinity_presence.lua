-- affinity_presence: announce (or withdraw) a worker, and list the live workers.
--
-- KEYS[1]  workers  zset  worker id -> expiry (ms, Redis TIME)
-- ARGV[1]  this worker's id ("<nodename>/<random>")
-- ARGV[2]  how long the announcement lives without renewal (ms)
-- ARGV[3]  "1": announce (add or renew); "0": withdraw (the worker is stopping)
--
-- Reply: the ids of the live workers (this one included when announced), in id order.
-- Workers whose announcement lapsed are removed first, so a worker killed with SIGKILL
-- drops out of every peer's list within one lease.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
