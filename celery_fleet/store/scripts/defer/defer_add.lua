-- defer_add: keep a task message until it is due.
--
-- KEYS[1]  due      zset  item id -> due time (ms, Redis TIME)
-- KEYS[2]  items    hash  item id -> the message (opaque to Redis)
-- ARGV[1]  item id (unique per deferral: a task id and its reschedule count)
-- ARGV[2]  delay (ms from now)
-- ARGV[3]  the message
--
-- Reply: the due time (ms). Adding the same item again replaces it (idempotent).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = now + math.max(0, tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], due, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return due
