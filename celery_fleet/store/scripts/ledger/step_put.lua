-- step_put: store one durable step's result and keep the run's steps alive.
--
-- KEYS[1]  steps  hash  step name -> result (JSON text)
-- ARGV[1]  step name
-- ARGV[2]  result (JSON text)
-- ARGV[3]  TTL of the run's steps (ms), counted from this write
--
-- Reply: 1 when stored, 0 when the step was already stored (the first result wins: two
-- copies of a run that raced must both see one answer). Time unit: milliseconds.

local stored = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return stored
