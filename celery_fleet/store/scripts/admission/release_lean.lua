-- release_lean: give a slot back when that is all there is to do: the lean release.
--
-- The client sends it instead of release.lua (admission/decision.py, release_lean_args
-- and lean_release) for a limit with no breaker, no adaptive cap and no capacity
-- discovery, when the call reports no Retry-After, was not settled, waits for no clock
-- and its lease is not one whose hold time is sampled (acquired at a µs divisible by 32).
-- Then release.lua would only ZREM the lease and, when someone is in line, sweep the line
-- and wake its first waiter: this does exactly that, the line's part being the same code
-- (_lib/line.lua's wake_next), so a release with nobody in line costs Redis a ZREM and an
-- EXISTS, inside one EVALSHA.
--
-- KEYS[1]  leases      zset  lease -> expiry (ms) (see acquire.lua)
-- KEYS[2]  line        zset  ticket id -> order key: callers waiting
-- KEYS[3]  waiting     zset  ticket id -> expiry (ms)
-- KEYS[4]  wake        prefix of the per-process wake-up lists (see _lib/line.lua)
-- KEYS[5]  key leases  zset  (only for a lease of a key with its own in-flight cap, see
--                       _lib/keys.lua): the lease leaves the key's semaphore too
-- ARGV[1]  lease
-- ARGV[2]  the line's constants, 3 little-endian doubles: max_in_flight (0 = no cap),
--          ticket TTL (ms), wake grace (ms); read only when someone is in line
--
-- Reply: 1 when the lease was held (released now), 0 when it had already expired.
-- Time unit: milliseconds, Redis TIME (read only when someone is in line).

local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if KEYS[5] then redis.call('ZREM', KEYS[5], ARGV[1]) end
if removed == 1 and redis.call('EXISTS', KEYS[2]) == 1 then
  -- the line's functions are made here, not on every call (a closure costs)
--#include _lib/line
  local max_in_flight, ticket_ttl, grace = struct.unpack('<ddd', ARGV[2])
  local t = redis.call('TIME')
  local now = (tonumber(t[1]) * 1000000 + tonumber(t[2])) / 1000
  wake_next(KEYS[2], KEYS[1], KEYS[3], KEYS[4], now, max_in_flight, ticket_ttl, grace)
end
return removed
