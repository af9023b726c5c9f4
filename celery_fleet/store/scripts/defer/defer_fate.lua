-- defer_fate: what became of a deferred item, read in one step (the pump moves it between
-- these keys atomically, so a read of one key after another could miss it in passing).
--
-- KEYS[1]  due        zset  item id -> due time (ms)
-- KEYS[2]  taken      zset  item id -> claim expiry (ms)
-- KEYS[3]  published  zset  item id -> when it was published (ms)
-- ARGV[1]  the item id
--
-- Reply: "waiting" (due or being published), "published", or "unknown" (never deferred
-- here, published over a day ago, or lost: Redis restarted empty).

local id = ARGV[1]
if redis.call('ZSCORE', KEYS[1], id) or redis.call('ZSCORE', KEYS[2], id) then
  return 'waiting'
end
if redis.call('ZSCORE', KEYS[3], id) then
  return 'published'
end
return 'unknown'
