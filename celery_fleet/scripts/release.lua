-- release: give a slot back and record how long it was held.
--
-- KEYS[1]  leases   zset   lease id -> expiry (ms)
-- KEYS[2]  holders  hash   lease id -> "<reserved tokens> <acquired at ms>"
-- KEYS[3]  ctl      hash   hold_ms (EWMA of hold times, read by acquire for its wait hint)
-- KEYS[4]  freed    list   gets one element per release: wakes one caller blocked in BLPOP
-- ARGV[1]  lease id
--
-- Reply: {1, now, held_ms}  released
--        {0, now, 0}        the lease was already gone (expired: somebody else may hold the slot)
-- Reserved tokens are not refunded here: settle does that; a failed call's tokens stay spent,
-- as providers count them. Time unit: milliseconds, Redis TIME.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local id = ARGV[1]
local rec = redis.call('HGET', KEYS[2], id)
local removed = redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
if removed == 0 or not rec then
  return {0, string.format('%.3f', now), 0}
end
redis.call('RPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], -64, -1)
redis.call('PEXPIRE', KEYS[4], 60000)
local acquired = tonumber(string.match(rec, ' (.+)$')) or now
local held = now - acquired
local old = tonumber(redis.call('HGET', KEYS[3], 'hold_ms'))
local ewma = held
if old then ewma = old * 0.8 + held * 0.2 end
redis.call('HSET', KEYS[3], 'hold_ms', string.format('%.3f', ewma))
return {1, string.format('%.3f', now), math.floor(held)}
