-- _lib/ledger: included (not run) by the ledger_* scripts: the Redis clock in ms, and one
-- capped history entry.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- history: a stream of every attempt's events, capped at ~64 entries, expiring with the run.
local function note(history, ttl, ...)
  redis.call('XADD', history, 'MAXLEN', '~', 64, '*', ...)
  redis.call('PEXPIRE', history, ttl)
end
