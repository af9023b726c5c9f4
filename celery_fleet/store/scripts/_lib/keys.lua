-- _lib/keys: included (not run) by acquire: a key's (tenant's) own budgets and its place in
-- the fair share of a limit's line. Only a limit configured with "keys" or "weights" sends
-- the key's two Redis keys (acquire's KEYS[8], KEYS[9]); see admission/tenancy.py.
--
-- A key's state, under the limit's hash tag, created on first use and expiring when idle:
--   ctl    hash  window fields ("r:60") -> GCRA arrival time (ms), like the limit's own;
--                vf: the key's last virtual finish tag (fair share); exp: when its TTL
--                runs out (refreshed only when due); name: the key as the caller wrote it
--                (for `celery fleet status`)
--   leases zset  lease -> expiry (ms): the key's own in-flight semaphore (only a key
--                sub-limit with max_in_flight has one)
--
-- Fair share is start-time fair queueing over the line: a ticket's order key is
-- lane * 2^42 + its start tag S = max(V, F_key), where V (the limit's ctl field "vt") is
-- the start tag of the last admitted ticket (1 at first: a tag is never 0) and F_key (the
-- key's "vf") the finish tag of the key's last ticket; F_key becomes S + 1 / weight. Tags count admissions, so a key
-- with weight 3 gets three turns for every one of a weight-1 key while both wait, a key
-- that went idle comes back at V (it never hoards credit) and inside one key tickets keep
-- the order they joined in. On a limit with lanes each lane is its own fair queue: lane
-- p > 0 keeps its virtual time in "vt<p>" and a key's finish tag in it in "vf<p>".

-- Defined only when the script is given a key's state (KEYS[8]): a limit without keys
-- does not pay for making these closures on every admission.
local key_consts, key_tag, key_expiry
if #KEYS > 7 then

-- key_consts(arg): the key's constants (acquire's ARGV after the limit's window fields):
-- sub (1: the key's own budgets apply; 0: the default key of keyless callers, fair share
-- only), weight, max_in_flight (0: none), keep (ms: how long an idle key's state lives
-- at least), the number of windows, then per window T and tau.
key_consts = function(arg)
  local sub, weight, kcap, keep, kn = struct.unpack('<ddddd', arg)
  local kwin = {struct.unpack('<' .. string.rep('d', 5 + 2 * kn), arg)}
  return sub, weight, kcap, keep, kn, kwin
end

-- key_tag(vt, vf): a new ticket's start tag. A finish tag absurdly far ahead of the
-- limit's virtual time (its ctl was reset) is not honoured.
key_tag = function(vt, vf)
  if vf > vt and vf - vt < 1048576 then return vf end
  return vt
end

-- key_expiry(hset, exp, now, horizon, keep): like ctl_expiry, for a key: lives `keep` ms
-- past its last use and past every arrival time in it; a new TTL only when half of it
-- is used up. Adds "exp" to hset, returns the TTL to PEXPIRE or false.
key_expiry = function(hset, exp, now, horizon, keep)
  local base = math.max(now, horizon)
  if exp and exp >= base + keep / 2 then return false end
  hset[#hset + 1] = 'exp'
  hset[#hset + 1] = string.format('%.0f', base + keep)
  return math.ceil(base + keep - now)
end

end
