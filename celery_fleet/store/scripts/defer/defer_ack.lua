-- defer_ack: a publisher published these items: forget them, and remember that they were.
--
-- KEYS[1]  taken      zset  item id -> claim expiry (ms)
-- KEYS[2]  items      hash  item id -> the message
-- KEYS[3]  published  zset  item id -> when it was published (ms), kept a day: the broker's
--                           backup copy of a deferred task learns here that it is not needed
-- ARGV     the item ids
--
-- Reply: how many were still claimed (an item whose claim lapsed may have been taken by
-- another publisher meanwhile: then both published it, and this ack drops it anyway).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('HDEL', KEYS[2], unpack(ARGV))
for _, id in ipairs(ARGV) do
  redis.call('ZADD', KEYS[3], now, id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 86400000)
redis.call('PEXPIRE', KEYS[3], 2 * 86400000)
return n
