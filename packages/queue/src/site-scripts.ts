// Destination limits in Lua: per destination site (the set of MX hosts a domain resolves to), the
// slots (SMTP transactions in flight, across every delivery worker) with their leases, the message
// rate, and the wait list of recipients that found no slot. Included after COMMON (scripts.ts),
// whose helpers (jkey, mkey, rkey, DUE, undispatch) they use.
//
// A slot is a member of `site:<id>:slots` (token → lease expiry, ms). The router takes one before it
// publishes a remote request; the status for that request releases it (FINISH_BY_ADDRESS or
// RELEASE_SLOTS), and a release hands the slot straight to the site's wait list (grant). Once the
// request's stream sequence is recorded (`site:<id>:req`), a slot whose lease ran out is only a
// suspect: the router's admission loop asks MAIL_DELIVER whether the request is still there (queued,
// or with a worker that will renew it) before the slot is given back. A slot nobody recorded a
// request for (the router died before publishing) is given back as soon as its lease runs out.

export const SITE = `
local SITES = P .. "sites"
local KNOWN = P .. "known-sites"
local function site_key(s) return P .. "site:" .. s end
local function slots_key(s) return P .. "site:" .. s .. ":slots" end
local function req_key(s) return P .. "site:" .. s .. ":req" end
local function wait_key(s) return P .. "site:" .. s .. ":wait" end
-- a policy written by a less specific rule (default < MX pattern < domain) does not replace a more
-- specific one written within this time: two domains on one site may carry different rules
local POLICY_STALE_MS = 600000

-- The site's policy and rate state, read once per script run (HMGET) and kept up to date here.
local CONF = {}
local function site_conf(s)
  local c = CONF[s]
  if not c then
    local f = redis.call("HMGET", site_key(s), "limit", "rn", "rms", "lease", "tat", "label", "prio", "at")
    c = {
      limit = tonumber(f[1]) or 1, rn = tonumber(f[2]) or 0, rms = tonumber(f[3]) or 0,
      lease = tonumber(f[4]) or 60000, tat = tonumber(f[5]) or 0, label = f[6], prio = tonumber(f[7]),
      at = tonumber(f[8]) or 0,
    }
    CONF[s] = c
  end
  return c
end

-- Writes the caller's policy unless a more specific one written lately holds; rewrites an unchanged
-- one only once a minute (to keep its time fresh, the key alive and the site among the known ones),
-- so admission mostly just reads.
local function configure(s, label, limit, rn, rms, prio, lease, now)
  local c = site_conf(s)
  limit, rn, rms, prio, lease = tonumber(limit), tonumber(rn), tonumber(rms), tonumber(prio), tonumber(lease)
  local wins = (not c.prio) or prio >= c.prio or now - c.at > POLICY_STALE_MS
  local same = c.prio == prio and c.label == label and c.limit == limit and c.rn == rn and c.rms == rms
    and c.lease == lease
  if wins and (not same or now - c.at > 60000) then
    redis.call("HSET", site_key(s), "label", label, "limit", limit, "rn", rn, "rms", rms, "prio", prio, "at", now,
      "lease", lease)
    redis.call("PEXPIRE", site_key(s), 604800000)
    c.label, c.limit, c.rn, c.rms, c.prio, c.at, c.lease = label, limit, rn, rms, prio, now, lease
    -- for the metrics: sites used lately (to the minute)
    redis.call("ZADD", KNOWN, now, s)
  end
end

-- Gives back slots whose lease ran out and whose request was never recorded; returns the expired
-- ones that were (token, "<seq> <dispatchId>", ...), for the router to look up.
local function reap(s, now)
  local sk, rk = slots_key(s), req_key(s)
  local suspects = {}
  for _, t in ipairs(redis.call("ZRANGEBYSCORE", sk, "-inf", "(" .. now)) do
    local req = redis.call("HGET", rk, t)
    if req then
      suspects[#suspects + 1] = t
      suspects[#suspects + 1] = req
    else
      redis.call("ZREM", sk, t)
    end
  end
  return suspects
end

-- The rate (GCRA): messages are spaced by period / messages, with a tolerance of one interval, so a
-- grant the admission loop makes a little late does not push every later one back (at most two may
-- start at once after a quiet time). When the next message may start:
local function rate_next(c)
  if c.rn <= 0 then return 0 end
  return c.tat - c.rms / c.rn
end

-- whether a message may start now: the rate allows it and a slot is free (expired slots are only
-- looked at when the site seems full)
local function can_start(s, now)
  local c = site_conf(s)
  if rate_next(c) > now then return false end
  local sk = slots_key(s)
  if redis.call("ZCARD", sk) < c.limit then return true end
  reap(s, now)
  return redis.call("ZCARD", sk) < c.limit
end

local function take(s, token, now)
  local c = site_conf(s)
  redis.call("ZADD", slots_key(s), now + c.lease, token)
  if c.rn > 0 then
    c.tat = math.floor(math.max(c.tat, now) + c.rms / c.rn + 0.5)
    redis.call("HSET", site_key(s), "tat", c.tat)
  end
end

-- When the admission loop should look at the site again: never without waiters; when the rate
-- allows the next message, or when the first slot's lease runs out.
local function schedule_check(s, now)
  if redis.call("EXISTS", wait_key(s)) == 0 then
    redis.call("ZREM", SITES, s)
    return
  end
  local c = site_conf(s)
  local sk = slots_key(s)
  local at = now
  if redis.call("ZCARD", sk) < c.limit then
    at = math.max(now, math.ceil(rate_next(c)))
  else
    local first = redis.call("ZRANGE", sk, 0, 0, "WITHSCORES")
    at = math.max(now, tonumber(first[2]) or now)
  end
  redis.call("ZADD", SITES, at, s)
end

-- Hands free slots to the site's waiting recipients, first come first served: the recipients of one
-- message that started waiting together go as one group (one request, one slot, up to 1000), back
-- to the schedule, due now, with the slot's token. Returns how many groups got a slot.
local function grant(s, now)
  local wk = wait_key(s)
  local granted = 0
  while can_start(s, now) do
    local head = redis.call("ZRANGE", wk, 0, 0, "WITHSCORES")
    if #head == 0 then break end
    local prefix = string.match(head[1], "^[^:]+") .. ":"
    local token = "g" .. redis.call("INCR", P .. "seq")
    local n = 0
    for _, id in ipairs(redis.call("ZRANGEBYSCORE", wk, head[2], head[2], "LIMIT", 0, 1000)) do
      if string.sub(id, 1, #prefix) ~= prefix then break end
      redis.call("ZREM", wk, id)
      local jk = jkey(id)
      if redis.call("EXISTS", jk) == 1 then
        redis.call("HSET", jk, "slot", token)
        redis.call("ZADD", DUE, now, id)
        n = n + 1
      end
    end
    if n > 0 then
      take(s, token, now)
      granted = granted + 1
    end
  end
  schedule_check(s, now)
  return granted
end

-- Ends a slot (its transaction is over) and passes it on. Returns how many groups got a slot.
local function release(s, token, now)
  if redis.call("ZREM", slots_key(s), token) == 0 then return 0 end
  redis.call("HDEL", req_key(s), token)
  if redis.call("EXISTS", wait_key(s)) == 0 then return 0 end
  return grant(s, now)
end

-- after the publish: which request holds the slot, so an expired lease can be checked against it
local function record_slot(s, token, req)
  if redis.call("ZSCORE", slots_key(s), token) then redis.call("HSET", req_key(s), token, req) end
end
`;

/**
 * First attempts. ARGV: prefix, site, token, label, limit, rateMessages, ratePeriodMs, priority,
 * leaseMs, now, queueId, rid1, rid2, ... Takes a slot for the request `token` (its dispatch id), or
 * makes the recipients retry jobs waiting in the site's wait list. A token already holding a slot
 * (a redelivered spool message) keeps it; recipients that are not pending or already have a job
 * (waiting, or granted) are left out. Returns {"ok", granted} | {"wait", granted, waiting}.
 */
export const ADMIT = (common: string) => `${common}${SITE}
local s, token, now = ARGV[2], ARGV[3], tonumber(ARGV[10])
configure(s, ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], now)
local sk = slots_key(s)
if redis.call("ZSCORE", sk, token) then
  redis.call("ZADD", sk, now + site_conf(s).lease, token)
  return {"ok", "0"}
end
-- recipients that wait already, were granted a slot, or went out after a grant (their request is
-- recorded) are not admitted twice: a spool message redelivered after a router died finds them so
local q = ARGV[11]
local todo = {}
for i = 12, #ARGV do
  local id = q .. ":" .. ARGV[i]
  if redis.call("EXISTS", jkey(id)) == 0 and redis.call("HEXISTS", DSEQ, id) == 0 then
    todo[#todo + 1] = ARGV[i]
  end
end
if #todo == 0 then return {"wait", "0", "0"} end
local granted = 0
local waiting = redis.call("EXISTS", wait_key(s)) == 1
if waiting then
  granted = grant(s, now)
  waiting = redis.call("EXISTS", wait_key(s)) == 1
end
if not waiting and can_start(s, now) then
  take(s, token, now)
  return {"ok", tostring(granted)}
end
local mk, rk = mkey(q), rkey(q)
if redis.call("EXISTS", mk) == 0 then return {"wait", tostring(granted), "0"} end
local received, tp = redis.call("HGET", mk, "receivedAt"), redis.call("HGET", mk, "traceparent") or ""
local n = 0
for _, rid in ipairs(todo) do
  local raw = redis.call("HGET", rk, rid)
  if raw and cjson.decode(raw).state == "pending" then
    local id = q .. ":" .. rid
    redis.call("HSET", jkey(id), "kind", "retry", "queueId", q, "rid", rid, "recipient", raw,
      "receivedAt", received, "traceparent", tp, "site", s)
    redis.call("ZADD", wait_key(s), now, id)
    undispatch(id)
    n = n + 1
  end
end
schedule_check(s, now)
return {"wait", tostring(granted), tostring(n)}
`;

/**
 * Retries the scheduler claimed. ARGV: prefix, site, token, label, limit, rateMessages, ratePeriodMs,
 * priority, leaseMs, now, id1, lease1, id2, lease2, ... As ADMIT, but the jobs exist: without a slot,
 * those still held under the caller's lease move from the lease set to the wait list.
 * Returns {"ok", granted} | {"wait", granted, waiting}.
 */
export const ADMIT_JOBS = (common: string) => `${common}${SITE}
local s, token, now = ARGV[2], ARGV[3], tonumber(ARGV[10])
configure(s, ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], now)
if redis.call("ZSCORE", slots_key(s), token) then
  redis.call("ZADD", slots_key(s), now + site_conf(s).lease, token)
  return {"ok", "0"}
end
local granted = 0
local waiting = redis.call("EXISTS", wait_key(s)) == 1
if waiting then
  granted = grant(s, now)
  waiting = redis.call("EXISTS", wait_key(s)) == 1
end
if not waiting and can_start(s, now) then
  take(s, token, now)
  return {"ok", tostring(granted)}
end
local n = 0
for i = 11, #ARGV, 2 do
  local id, lease = ARGV[i], ARGV[i + 1]
  local jk = jkey(id)
  if redis.call("HGET", jk, "lease") == lease then
    redis.call("ZREM", LEASE, id)
    redis.call("HDEL", jk, "lease", "slot")
    redis.call("HSET", jk, "site", s)
    redis.call("ZADD", wait_key(s), now, id)
    n = n + 1
  end
end
schedule_check(s, now)
return {"wait", tostring(granted), tostring(n)}
`;

/** ARGV: prefix, now, site1, token1, site2, token2, ... Ends slots; returns how many groups got one. */
export const RELEASE_SLOTS = (common: string) => `${common}${SITE}
local now = tonumber(ARGV[2])
local granted = 0
for i = 3, #ARGV, 2 do granted = granted + release(ARGV[i], ARGV[i + 1], now) end
return granted
`;

/**
 * The admission loop. ARGV: prefix, now, maxSites. For sites due for a look: gives back expired slots
 * with no recorded request, grants free slots to waiters. Returns {granted, nextCheckMs|"",
 * site, token, req, site, token, req, ...} with the expired slots whose request must be looked up.
 */
export const GRANT_DUE = (common: string) => `${common}${SITE}
local now = tonumber(ARGV[2])
local out = {0, ""}
for _, s in ipairs(redis.call("ZRANGEBYSCORE", SITES, "-inf", now, "LIMIT", 0, tonumber(ARGV[3]))) do
  local sus = reap(s, now)
  for i = 1, #sus, 2 do
    out[#out + 1] = s
    out[#out + 1] = sus[i]
    out[#out + 1] = sus[i + 1]
  end
  out[1] = out[1] + grant(s, now)
end
local first = redis.call("ZRANGE", SITES, 0, 0, "WITHSCORES")
if first[2] then out[2] = first[2] end
out[1] = tostring(out[1])
return out
`;

/**
 * After the lookups: ARGV: prefix, now, site1, token1, keep1, ... A slot whose request is still in
 * MAIL_DELIVER ("1") gets a new lease; one whose request is gone ("0") is given back. Returns how
 * many groups got a slot.
 */
export const SETTLE_SLOTS = (common: string) => `${common}${SITE}
local now = tonumber(ARGV[2])
local sites = {}
for i = 3, #ARGV, 3 do
  local s, token = ARGV[i], ARGV[i + 1]
  if ARGV[i + 2] == "1" then
    redis.call("ZADD", slots_key(s), "XX", now + site_conf(s).lease, token)
  else
    redis.call("ZREM", slots_key(s), token)
    redis.call("HDEL", req_key(s), token)
  end
  sites[s] = true
end
local granted = 0
for s in pairs(sites) do granted = granted + grant(s, now) end
return granted
`;

/**
 * The delivery worker's lease. ARGV: prefix, site, token, until, now. Extends the slot while the
 * token holds it ("held"); when its lease ran out and it was given back, takes a free slot again
 * ("retaken"), else answers "full": the request must not start.
 */
export const RENEW_SLOT = (common: string) => `${common}${SITE}
local s, token, now = ARGV[2], ARGV[3], tonumber(ARGV[5])
local sk = slots_key(s)
if redis.call("ZSCORE", sk, token) then
  redis.call("ZADD", sk, "XX", ARGV[4], token)
  return "held"
end
reap(s, now)
if redis.call("ZCARD", sk) < site_conf(s).limit then
  redis.call("ZADD", sk, ARGV[4], token)
  return "retaken"
end
return "full"
`;

/**
 * Metrics. ARGV: prefix, now, max. Forgets sites unused for a day; returns, for the `max` most
 * recently used, {site, label, slots in use, recipients waiting, limit, ...}.
 */
export const SITE_STATS = (common: string) => `${common}${SITE}
local now = tonumber(ARGV[2])
redis.call("ZREMRANGEBYSCORE", KNOWN, "-inf", now - 86400000)
local out = {}
for _, s in ipairs(redis.call("ZREVRANGE", KNOWN, 0, tonumber(ARGV[3]) - 1)) do
  local f = redis.call("HMGET", site_key(s), "label", "limit")
  out[#out + 1] = s
  out[#out + 1] = f[1] or s
  out[#out + 1] = tostring(redis.call("ZCARD", slots_key(s)))
  out[#out + 1] = tostring(redis.call("ZCARD", wait_key(s)))
  out[#out + 1] = f[2] or "0"
end
return out
`;
