-- lock_acquire: take the lease on a name (a lock, or a leader election) unless another owner
-- holds it; a new lease gets the name's next fencing token.
--
-- KEYS[1]  lease  hash    owner, token; expires (PEXPIRE, Redis's clock) unless renewed
-- KEYS[2]  fence  string  the last token handed out for the name; it never expires
-- ARGV[1]  owner: the id of this hold (unique per acquisition, or per leadership term)
-- ARGV[2]  the lease (ms)
--
-- A new token is max(last token + 1, Redis TIME in microseconds): strictly increasing per
-- name, and still above every earlier token when Redis lost the fence key (restarted
-- empty, failed over to a replica that missed it, evicted it), as long as the Redis clock
-- did not go back. Microseconds since 1970 stay below 2^53 (exact in a Lua number) until
-- the year 2255.
--
-- Reply: {1, token} acquired; also when the lease is already this owner's (an acquire whose
-- reply was lost, asked again): the same token, the lease extended.
-- {0, ms} another owner holds it, for ms more unless renewed.
local held = redis.call('HMGET', KEYS[1], 'owner', 'token')
if held[1] and held[1] ~= ARGV[1] then
  return {0, math.max(redis.call('PTTL', KEYS[1]), 0)}
end
local token = tonumber(held[2])
if not held[1] then
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
  token = math.max((tonumber(redis.call('GET', KEYS[2])) or 0) + 1, floor)
  -- '%.0f': a plain integer string (tostring would round to 14 digits)
  local text = string.format('%.0f', token)
  redis.call('SET', KEYS[2], text)
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', text)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, token}
