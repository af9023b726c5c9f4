-- presence: record that a fleet process is alive (and the slots it holds), count the live.
--
-- KEYS[1]  live  zset  process id -> expiry (ms, Redis TIME)
-- KEYS[2]  held  hash  process id -> JSON list of the slots it holds (absent: none)
-- ARGV[1]  this process's id ("<host>:<pid>:<random>")
-- ARGV[2]  how long the record lives without renewal (ms)
-- ARGV[3]  the slots it holds, as JSON ("" when none)
--
-- Reply: the number of live processes, this one included. The store-down policy divides
-- the budgets among them when Redis becomes unreachable (see fallback.py); `celery inspect
-- fleet` reads the held slots of a worker's pool processes from KEYS[2].

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
if #dead > 0 then
  redis.call('ZREM', KEYS[1], unpack(dead))
  redis.call('HDEL', KEYS[2], unpack(dead))
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return redis.call('ZCARD', KEYS[1])
