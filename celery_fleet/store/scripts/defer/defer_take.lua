-- defer_take: hand due messages to one publisher, atomically (nobody else gets them).
--
-- KEYS[1]  due      zset  item id -> due time (ms)
-- KEYS[2]  items    hash  item id -> the message
-- KEYS[3]  taken    zset  item id -> when its publisher's claim lapses (ms)
-- ARGV[1]  how many to take at most
-- ARGV[2]  claim (ms): a publisher that dies before acknowledging loses the items after
--          this, and they are due again (published at least once, never lost)
--
-- Reply: {id1, message1, id2, message2, ...}, oldest due first.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(lapsed) do
  redis.call('ZADD', KEYS[1], now, id)
end
if #lapsed > 0 then redis.call('ZREM', KEYS[3], unpack(lapsed)) end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  local message = redis.call('HGET', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  if message then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), id)
    out[#out + 1] = id
    out[#out + 1] = message
  end
end
return out
