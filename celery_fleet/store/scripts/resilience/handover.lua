-- handover: the moment the fleet's processes leave their local limiters after an outage.
--
-- The first process Redis answers again sets the moment a little ahead; every other one
-- that finds Redis back reads it, so they all switch together: none admits at the whole
-- budget through Redis while others still admit their local share (see fallback.py).
--
-- KEYS[1]  handover  string  the moment (ms, Redis TIME)
-- ARGV[1]  how long ago this process lost Redis (ms): a moment set before that belongs to
--          an earlier outage and is replaced
-- ARGV[2]  how far ahead a new moment is set (ms)
-- ARGV[3]  how long the moment is kept (ms): a process back later than it switches at once
--
-- Reply: {moment, now}, integers (ms). Time unit: milliseconds.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost_at = now - tonumber(ARGV[1])
local moment = tonumber(redis.call('GET', KEYS[1]))
if not moment or moment < lost_at then
  moment = now + tonumber(ARGV[2])
  redis.call('SET', KEYS[1], moment, 'PX', tonumber(ARGV[2]) + tonumber(ARGV[3]))
end
return {moment, now}
