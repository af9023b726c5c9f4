-- lock_acquire: take the lease on a name (a lock, or a leader election) unless another owner
-- holds it; a new lease gets the name's next fencing token.
--
-- KEYS[1]  lease  hash    owner, token; expires (PEXPIRE, Redis's clock) unless renewed
-- KEYS[2]  fence  string  the last token handed out for the name (INCR); it never expires,
--                         so the tokens of a name never go back
-- ARGV[1]  owner: the id of this hold (unique per acquisition, or per leadership term)
-- ARGV[2]  the lease (ms)
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
  token = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, token}
