-- presence: record that a fleet process is alive (and the slots it holds), count the live.
--
-- KEYS[1]  live  zset  process id -> expiry (ms, Redis TIME)
-- KEYS[2]  held  hash  process id -> JSON {"at": wall time s, "slots": [...]} (absent: none)
-- ARGV[1]  this process's id ("<host>:<pid>:<random>")
-- ARGV[2]  how long the record lives without renewal (ms)
-- ARGV[3]  the slots it holds, as that JSON ("" when none)
--
-- Reply: {live, rank}: the number of live processes, this one included, and this one's
-- place among them in the order of their ids (0-based). The store-down policy divides the
-- budgets among them when Redis becomes unreachable, and the rank decides which processes
-- get the free in-flight slots that do not divide evenly (see fallback.py); `celery
-- inspect fleet` reads the held slots of a worker's pool processes from KEYS[2].

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
local rank = 0
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, other in ipairs(ids) do
  if other < ARGV[1] then rank = rank + 1 end
end
return {#ids, rank}
