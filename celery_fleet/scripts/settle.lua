-- settle: replace a lease's token reservation by the actual usage.
--
-- KEYS[1]  gcra     hash   window field -> theoretical arrival time (ms)
-- KEYS[2]  holders  hash   lease id -> "<reserved tokens> <acquired at ms> <in flight then>"
-- ARGV[1]  lease id
-- ARGV[2]  actual tokens used
-- ARGV[3]  tokens the client believes are reserved (used only when the lease is gone)
-- ARGV[4]  number of token windows n, then n pairs: field, emission interval T (ms)
--
-- The TAT of every token window moves by (actual - reserved) * T: a refund when the call
-- used less than estimated, a charge when it used more. A refund never takes a window
-- below "full bucket" (TAT = now). The reservation becomes `actual`, so settling twice with
-- the same number changes nothing: tokens are never counted twice.
--
-- Reply: {1, delta, now}  settled against the lease's own record
--        {0, delta, now}  the lease was gone; settled against the client's figure
-- Time unit: milliseconds, Redis TIME.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local id = ARGV[1]
local actual = tonumber(ARGV[2])
local rec = redis.call('HGET', KEYS[2], id)
local reserved = tonumber(ARGV[3])
local acquired = nil
local known = 0
if rec then
  reserved = tonumber(string.match(rec, '^(%S+)'))
  acquired = string.match(rec, ' (.+)$')
  known = 1
end
local delta = actual - reserved
local nwin = tonumber(ARGV[4])
if delta ~= 0 and nwin > 0 then
  local horizon = now
  for i = 1, nwin do
    local field = ARGV[3 + 2 * i]
    local emission = tonumber(ARGV[4 + 2 * i])
    local tat = tonumber(redis.call('HGET', KEYS[1], field)) or now
    if tat < now then tat = now end
    local new_tat = tat + delta * emission
    if new_tat < now then new_tat = now end
    if new_tat > horizon then horizon = new_tat end
    redis.call('HSET', KEYS[1], field, string.format('%.3f', new_tat))
  end
  local need = math.ceil(horizon - now) + 1000
  if redis.call('PTTL', KEYS[1]) < need then redis.call('PEXPIRE', KEYS[1], need) end
end
if known == 1 then
  redis.call('HSET', KEYS[2], id, actual .. ' ' .. acquired)
end
return {known, delta, string.format('%.3f', now)}
