-- leave: give up a place in line (the caller stops waiting), waking the next in line.
--
-- KEYS[1]  line     zset   ticket id -> order key
-- KEYS[2]  waiting  zset   ticket id -> expiry (ms)
-- KEYS[3]  wake     prefix of the per-process wake-up lists (see _lib/line.lua)
-- ARGV[1]  ticket id
-- ARGV[2]  ticket TTL (ms)
-- ARGV[3]  wake grace (ms)
--
-- Reply: 1 if the ticket was in line, else 0. A ticket at the head passes its turn on: the
-- next one is woken, so the line never waits for a caller that left. Time unit: ms.

--#include _lib/line

local id = ARGV[1]
local rank = redis.call('ZRANK', KEYS[1], id)
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
redis.call('LREM', wake_list(KEYS[3], id), 0, id)
if rank == false then return 0 end
if rank == 0 then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if head then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
    wake(KEYS[2], KEYS[3], head, tonumber(ARGV[2]), now + tonumber(ARGV[3]))
  end
end
return 1
