-- record_cas: write a versioned record if its version is still the one the writer read.
--
-- KEYS[1]  record  hash  value (JSON text), version (1 after the first write, +1 per write)
-- ARGV[1]  the version the writer read (0: the record was absent)
-- ARGV[2]  the new value (JSON text)
-- ARGV[3]  TTL (ms) from this write; 0: the record never expires
--
-- Reply: {1, version} written, now at version; {0, version} not written: another write
-- came first (version is the current one; 0 when absent).
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
redis.call('HSET', KEYS[1], 'value', ARGV[2], 'version', current + 1)
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
return {1, current + 1}
