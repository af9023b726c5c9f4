-- limit_config: write (or remove) one limit's runtime override, under a version that only grows.
--
-- KEYS[1]  config  hash   the namespace's runtime overrides (never expires: it is configuration):
--                         "version" -> the namespace's version (the one key every process polls);
--                         "limit:<name>" -> the fields set at runtime (JSON text, opaque here);
--                         "version:<name>" -> the version of the last write of that limit
-- ARGV[1]  the limit's name; "" only makes sure the namespace's version is above the floor
--          (a process that saw versions finds the hash gone: it was flushed or lost)
-- ARGV[2]  the version of "limit:<name>" the writer read and validated against (0: none);
--          -1 writes whatever is there (a reset)
-- ARGV[3]  the limit's new fields (JSON text); "" removes the override (back to the
--          configured values)
-- ARGV[4]  floor: the new version is above it (the highest version the writer has seen),
--          ARGV[5..] with ARGV[1] = "": the limits whose "version:<name>" the rewrite sets too
--
-- Reply: {1, version} written; {0, version} not written: the limit's entry changed since the
-- writer read it (version: the current one), or, with ARGV[1] = "", the namespace's version is
-- already above the floor. Time unit: a version is Redis TIME in microseconds at the write, or
-- one more than the highest version the hash or the writer knew when the clock is behind it,
-- so a version never goes backwards, also after the hash was lost (the writer's floor, and
-- the clock, are past every version written before).
local function at_least(v, floor)
  if floor + 1 > v then return floor + 1 end
  return v
end
local t = redis.call('TIME')
local now_us = tonumber(t[1] .. string.format('%06d', tonumber(t[2])))
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local floor = tonumber(ARGV[4])
local version = at_least(at_least(now_us, current), floor)
local v = string.format('%d', version)
if ARGV[1] == '' then
  if current > floor then return {0, current} end
  local hset = {'version', v}
  for i = 5, #ARGV do
    hset[#hset + 1] = 'version:' .. ARGV[i]
    hset[#hset + 1] = v
  end
  redis.call('HSET', KEYS[1], unpack(hset))
  return {1, version}
end
local field = 'limit:' .. ARGV[1]
local read = tonumber(redis.call('HGET', KEYS[1], 'version:' .. ARGV[1]) or '0')
if ARGV[2] ~= '-1' and read ~= tonumber(ARGV[2]) then return {0, read} end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], field)
else
  redis.call('HSET', KEYS[1], field, ARGV[3])
end
redis.call('HSET', KEYS[1], 'version:' .. ARGV[1], v, 'version', v)
return {1, version}
