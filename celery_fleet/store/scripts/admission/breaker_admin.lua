-- breaker_admin: read a limit's circuit breaker, or override it by hand (CLI, operators).
--
-- KEYS[1]  breaker  hash   state, opened_at, forced, probe, probe_until, window counters
-- ARGV[1]  operation: state | force_open | force_closed | unforce | reset | trip
-- ARGV[2]  trip only: how long ago (ms) the breaker is to have opened
--
-- force_open refuses every call until unforce/reset; force_closed admits every call and
-- never trips; reset forgets everything (closed, no counts); trip opens it as if it had
-- tripped ARGV[2] ms ago, with no override (0: refused for reset_timeout, then one probe;
-- reset_timeout: half-open now, the next caller is the probe).
-- Reply: {state, opened_at, forced, probe, probe_until, now, calls, failures}
-- (missing fields as ""). Time unit: milliseconds, Redis TIME.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local op = ARGV[1]
-- An override lasts until lifted (no expiry); the breaker's own state expires after a
-- day without calls, as the release script does.
if op == 'force_open' then
  redis.call('HSET', KEYS[1], 'forced', 'open')
  redis.call('HDEL', KEYS[1], 'exp')
  redis.call('PERSIST', KEYS[1])
elseif op == 'force_closed' then
  redis.call('HSET', KEYS[1], 'forced', 'closed')
  redis.call('HDEL', KEYS[1], 'exp')
  redis.call('PERSIST', KEYS[1])
elseif op == 'unforce' then
  redis.call('HDEL', KEYS[1], 'forced')
  redis.call('PEXPIRE', KEYS[1], 86400000)
elseif op == 'reset' then
  redis.call('DEL', KEYS[1])
elseif op == 'trip' then
  local ago = tonumber(ARGV[2]) or 0
  local at = string.format('%.3f', now)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', string.format('%.3f', now - ago),
             'win_start', at, 'calls', 0, 'failures', 0, 'prev_calls', 0, 'prev_failures', 0,
             'exp', string.format('%.3f', now + 86400000))
  -- a running probe's release then counts for nothing (release.lua: not the probe, and open)
  redis.call('HDEL', KEYS[1], 'forced', 'probe', 'probe_until')
  redis.call('PEXPIRE', KEYS[1], 86400000)
elseif op ~= 'state' then
  return redis.error_reply('unknown breaker operation ' .. op)
end
local b = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'forced', 'probe', 'probe_until',
                     'calls', 'failures')
for i = 1, 7 do b[i] = b[i] or '' end
return {b[1], b[2], b[3], b[4], b[5], string.format('%.3f', now), b[6], b[7]}
