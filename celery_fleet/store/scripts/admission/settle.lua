-- settle: replace a lease's token reservation by the actual usage.
--
-- KEYS[1]  ctl      hash   window field -> theoretical arrival time (ms), exp (see _lib/ctl.lua)
-- KEYS[2]  settled  hash   lease -> tokens it was settled to (absent: what the lease reserved)
-- KEYS[3]  leases   zset   lease -> expiry (ms): says whether the lease is still held
-- ARGV[1]  lease ("<acquired µs>.<in flight then>.<reserved tokens>.<id>", see acquire.lua)
-- ARGV[2]  actual tokens used
-- ARGV[3]  tokens the client believes are reserved (used only when the lease is gone)
-- ARGV[4]  number of token windows n, then n triples: field, emission interval T (ms),
--          the furthest the window's TAT may lie ahead of now (ms: tolerance + one period)
-- KEYS[4]  key ctl  hash  (only for a lease of a key with its own token windows, see
--                        _lib/keys.lua); then ARGV goes on after the limit's triples with
--                        the key's: their number k, then k triples as above
--
-- The TAT of every token window moves by (actual - reserved) * T: a refund when the call
-- used less than estimated, a charge when it used more. A refund never takes a window
-- below "full bucket" (TAT = now); a charge never takes it beyond one period of debt, so
-- an absurd figure blocks the window for at most one period, not for years. The
-- reservation becomes `actual`, so settling twice with the same number changes nothing:
-- tokens are never counted twice. Everything is computed before the first write.
--
-- Reply: {known, delta, now, held}
--   known 1: settled against the lease's own record; 0: the lease was gone (released or
--   expired), settled against the client's figure. held 1: the lease is live right now.
-- Time unit: milliseconds, Redis TIME.

--#include _lib/ctl

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local id = ARGV[1]
local actual = tonumber(ARGV[2])
local reserved = tonumber(ARGV[3])
local score = tonumber(redis.call('ZSCORE', KEYS[3], id))
local known = 0
if score then
  known = 1
  reserved = tonumber(redis.call('HGET', KEYS[2], id)) or tonumber(string.match(id, '^%d+%.%d+%.(%d+)%.'))
    or reserved
end
local held = 0
if score and score > now then held = 1 end
local delta = actual - reserved
-- move the token windows of hash `key` whose triples start at ARGV[at] (n of them)
local function shift(key, at, n, keyed)
  if delta == 0 or n <= 0 then return end
  local hset, horizon = {}, now
  local fields = {}
  for i = 1, n do fields[i] = ARGV[at + 3 * (i - 1)] end
  fields[n + 1] = 'exp'
  local tats = redis.call('HMGET', key, unpack(fields))
  if keyed and not tats[n + 1] then return end  -- an idle key's state expired: nothing to move
  for i = 1, n do
    local emission = tonumber(ARGV[at + 3 * (i - 1) + 1])
    local furthest = tonumber(ARGV[at + 3 * (i - 1) + 2])
    local tat = tonumber(tats[i]) or now
    if tat < now then tat = now end
    local new_tat = math.min(math.max(tat + delta * emission, now), now + furthest)
    if new_tat > horizon then horizon = new_tat end
    hset[#hset + 1] = fields[i]
    hset[#hset + 1] = string.format('%.3f', new_tat)
  end
  if keyed then
    -- the key lives past its arrival times (its TTL is set by acquire: only lengthened)
    redis.call('HSET', key, unpack(hset))
    local left = math.ceil(horizon - now) + 1000
    if redis.call('PTTL', key) < left then redis.call('PEXPIRE', key, left) end
    return
  end
  local refresh = ctl_expiry(hset, tonumber(tats[n + 1]), now, horizon)
  redis.call('HSET', key, unpack(hset))
  if refresh then redis.call('PEXPIRE', key, refresh) end
end
local nwin = tonumber(ARGV[4])
shift(KEYS[1], 5, nwin, false)
if KEYS[4] then shift(KEYS[4], 6 + 3 * nwin, tonumber(ARGV[5 + 3 * nwin]), true) end
if known == 1 then
  -- Kept until the release (or the sweep of an expired lease) drops it; the TTL is a backstop.
  redis.call('HSET', KEYS[2], id, actual)
  redis.call('PEXPIRE', KEYS[2], 86400000)
end
return {known, delta, string.format('%.3f', now), held}
