// Lua scripts: every state change that must not interleave with another replica's runs as one script.
// Key names are built inside the scripts from the prefix (ARGV[1]) because job and message ids are
// only known there (claim); this is fine on a single Redis or Sentinel, not on Redis Cluster.
//
// Scripts that touch destination sites (slots, wait lists) include SITE from site-scripts.ts.
//
// Numbers that reach ZADD or PX are passed through as the caller's strings where possible: Lua 5.1
// formats numbers with %.14g, which is exact for millisecond timestamps but not for everything.

import { SITE } from "./site-scripts.ts";

export const COMMON = `
local P = ARGV[1]
local function mkey(q) return P .. "m:" .. q end
local function rkey(q) return P .. "r:" .. q end
local function akey(q) return P .. "a:" .. q end
local function bkey(q) return P .. "b:" .. q end
local function tkey(q) return P .. "t:" .. q end
local function jkey(id) return P .. "j:" .. id end
local DUE = P .. "due"
local TASKS = P .. "tasks"
local LEASE = P .. "lease"
local MESSAGES = P .. "messages"
-- recipients handed to a worker and not heard of since, by dispatch time; member = the retry job id
local DISPATCHED = P .. "dispatched"
-- the MAIL_DELIVER stream sequence of the request each DISPATCHED entry waits on (same member ids)
local DSEQ = P .. "dseq"

-- operator holds (mailctl queue hold): rules "all", "d:<domain>", "m:<queue id>"; held retry jobs
-- wait in HELD (score: when they were due) instead of DUE until released
local HOLDS = P .. "holds"
local HELD = P .. "held"

-- whether a retry job is held by a rule in force (a job the operator marked, or one granted a
-- destination slot, is not: it goes out, so no slot is kept by a held job)
local function is_held(jk)
  if redis.call("EXISTS", HOLDS) == 0 then return false end
  local f = redis.call("HMGET", jk, "queueId", "recipient", "mark", "slot")
  if f[3] or f[4] then return false end
  if redis.call("HEXISTS", HOLDS, "all") == 1 then return true end
  if f[1] and redis.call("HEXISTS", HOLDS, "m:" .. f[1]) == 1 then return true end
  if f[2] then
    local ok, r = pcall(cjson.decode, f[2])
    if ok and r.domain and redis.call("HEXISTS", HOLDS, "d:" .. string.lower(r.domain)) == 1 then return true end
  end
  return false
end

local function undispatch(id)
  redis.call("ZREM", DISPATCHED, id)
  redis.call("HDEL", DSEQ, id)
end

-- also ends the recipient's wait for a worker's result: it is final now, or has a retry job
local function drop_job(id)
  undispatch(id)
  -- a recipient waiting for a destination slot leaves its site's wait list
  local site = redis.call("HGET", jkey(id), "site")
  if site then redis.call("ZREM", P .. "site:" .. site .. ":wait", id) end
  redis.call("ZREM", DUE, id)
  redis.call("ZREM", TASKS, id)
  redis.call("ZREM", LEASE, id)
  redis.call("DEL", jkey(id))
end

-- whether the sender asked to hear of the recipient's final state (RFC 3461 NOTIFY): failures by
-- default, successes only with NOTIFY=SUCCESS (records from before it have no notifySuccess)
local function wants_report(r)
  if r.state == "delivered" then return r.notifySuccess == true end
  return r.notifyFailure == true
end

-- one failure-DSN job per message; bounces (and successes with NOTIFY=SUCCESS) arriving while it
-- waits (or runs) join it, and the task sends a failure report and a success report as needed
local function ensure_failure_dsn(q, due)
  local id = q .. ":dsn-failure"
  if redis.call("EXISTS", jkey(id)) == 0 then
    redis.call("HSET", jkey(id), "kind", "dsn", "dsnKind", "failure", "queueId", q)
    redis.call("ZADD", TASKS, due, id)
  end
end

-- When no recipient is pending and no DSN still needs the body: drop the state, leave a tombstone,
-- and queue the body's deletion. Returns receivedAt when it finalized.
local function finalize(q, now, tomb_ttl)
  local mk = mkey(q)
  if redis.call("EXISTS", mk) == 0 then return false end
  if tonumber(redis.call("HGET", mk, "open") or "0") > 0 then return false end
  if redis.call("SCARD", bkey(q)) > 0 then return false end
  if redis.call("EXISTS", jkey(q .. ":dsn-failure")) == 1 then return false end
  if redis.call("EXISTS", jkey(q .. ":dsn-delay")) == 1 then return false end
  local received = redis.call("HGET", mk, "receivedAt")
  local body = redis.call("HGET", mk, "body")
  local spool = redis.call("HGET", mk, "spool") or ""
  local gc = q .. ":gc"
  redis.call("HSET", jkey(gc), "kind", "gc", "queueId", q, "body", body, "spool", spool)
  redis.call("ZADD", TASKS, now, gc)
  redis.call("DEL", mk, rkey(q), akey(q), bkey(q))
  redis.call("ZREM", MESSAGES, q)
  redis.call("SET", tkey(q), received, "PX", tomb_ttl)
  return received
end
`;

/** ARGV: prefix, queueId, now, messageJson, recipientsJson, tombstoneTtlMs, dsnBatchDelayMs */
export const CREATE_MESSAGE = `${COMMON}
local q, now = ARGV[2], ARGV[3]
if redis.call("EXISTS", tkey(q)) == 1 then return {"finished"} end
local mk, rk = mkey(q), rkey(q)
local status = "exists"
if redis.call("EXISTS", mk) == 0 then
  status = "created"
  local m = cjson.decode(ARGV[4])
  local rs = cjson.decode(ARGV[5])
  local open, total = 0, 0
  local bounced = false
  for _, r in ipairs(rs) do
    if redis.call("HEXISTS", rk, r.rid) == 0 then
      total = total + 1
      if r.state == "pending" then
        open = open + 1
        -- the router publishes right after this: from now on it waits for the worker's result
        redis.call("ZADD", DISPATCHED, now, q .. ":" .. r.rid)
      elseif m.notices == "1" and r.notifyFailure then
        redis.call("SADD", bkey(q), r.rid)
        bounced = true
      end
      redis.call("HSET", rk, r.rid, cjson.encode(r))
      if r.kind == "local" and r.address ~= r.mailbox then
        redis.call("HSET", akey(q), r.address, r.rid)
      end
    end
  end
  for field, value in pairs(m) do redis.call("HSET", mk, field, value) end
  redis.call("HSET", mk, "open", open, "total", total, "delayNotified", "0")
  redis.call("ZADD", MESSAGES, m.receivedMs, q)
  if bounced then ensure_failure_dsn(q, tonumber(now) + tonumber(ARGV[7])) end
  if finalize(q, now, ARGV[6]) then return {"finalized"} end
end
local out = {status}
for _, v in ipairs(redis.call("HVALS", rk)) do out[#out + 1] = v end
return out
`;

/**
 * ARGV: prefix, queueId, rid, expectedAttempt, state, patchJson, dsn ("1" to report it, when the
 * recipient's NOTIFY asks for this state), now,
 * dsnBatchDelayMs, tombstoneTtlMs
 * Returns {"missing"} | {"stale", recipientJson} | {"ok", recipientJson, finalizedReceivedAt|"", dsnQueued}
 */
export const FINISH_RECIPIENT = `${COMMON}
local q, rid, now = ARGV[2], ARGV[3], ARGV[8]
local mk, rk = mkey(q), rkey(q)
if redis.call("EXISTS", mk) == 0 then return {"missing"} end
local raw = redis.call("HGET", rk, rid)
if not raw then return {"missing"} end
local r = cjson.decode(raw)
if r.state ~= "pending" or tonumber(r.attempt) ~= tonumber(ARGV[4]) then return {"stale", raw} end
r.state = ARGV[5]
for field, value in pairs(cjson.decode(ARGV[6])) do r[field] = value end
local encoded = cjson.encode(r)
redis.call("HSET", rk, rid, encoded)
redis.call("HINCRBY", mk, "open", -1)
drop_job(q .. ":" .. rid)
local queued = "0"
if ARGV[7] == "1" and wants_report(r) and redis.call("HGET", mk, "notices") == "1" then
  redis.call("SADD", bkey(q), rid)
  ensure_failure_dsn(q, tonumber(now) + tonumber(ARGV[9]))
  queued = "1"
end
local fin = finalize(q, now, ARGV[10])
return {"ok", encoded, fin or "", queued}
`;

/**
 * A worker's status in one round trip: the request's destination slot is released (and passed on to
 * the site's wait list), the recipient found by the address the worker reported (remote:
 * `r:<address>`; local: `l:<mailbox>`, or the copy's address through the alias map), then
 * FINISH_RECIPIENT. ARGV: prefix, queueId, address, kind ("local" | "remote"), expectedAttempt, state,
 * patchJson, dsn, now, dsnBatchDelayMs, tombstoneTtlMs, slotSite ("" for none), slotToken.
 * Returns as FINISH_RECIPIENT, with one more element: how many waiting groups got the slot.
 */
export const FINISH_BY_ADDRESS = `${COMMON}${SITE}
local q, address, now = ARGV[2], ARGV[3], ARGV[9]
local granted = 0
if ARGV[12] and ARGV[12] ~= "" then granted = release(ARGV[12], ARGV[13], tonumber(now)) end
granted = tostring(granted)
local mk, rk = mkey(q), rkey(q)
if redis.call("EXISTS", mk) == 0 then return {"missing", "", "", "0", granted} end
local rid
if ARGV[4] == "remote" then
  rid = "r:" .. address
elseif redis.call("HEXISTS", rk, "l:" .. address) == 1 then
  rid = "l:" .. address
else
  rid = redis.call("HGET", akey(q), address)
end
if not rid then return {"missing", "", "", "0", granted} end
local raw = redis.call("HGET", rk, rid)
if not raw then return {"missing", "", "", "0", granted} end
local r = cjson.decode(raw)
if r.state ~= "pending" or tonumber(r.attempt) ~= tonumber(ARGV[5]) then return {"stale", raw, "", "0", granted} end
r.state = ARGV[6]
for field, value in pairs(cjson.decode(ARGV[7])) do r[field] = value end
local encoded = cjson.encode(r)
redis.call("HSET", rk, rid, encoded)
redis.call("HINCRBY", mk, "open", -1)
drop_job(q .. ":" .. rid)
local queued = "0"
if ARGV[8] == "1" and wants_report(r) and redis.call("HGET", mk, "notices") == "1" then
  redis.call("SADD", bkey(q), rid)
  ensure_failure_dsn(q, tonumber(now) + tonumber(ARGV[10]))
  queued = "1"
end
local fin = finalize(q, now, ARGV[11])
return {"ok", encoded, fin or "", queued, granted}
`;

/**
 * ARGV: prefix, queueId, rid, expectedAttempt, dueAt, patchJson, delayNotice ("1" when due), now
 * Returns {"missing"} | {"stale", recipientJson} | {"ok", recipientJson, delayQueued}
 */
export const SCHEDULE_RETRY = `${COMMON}
local q, rid, now = ARGV[2], ARGV[3], ARGV[8]
local mk, rk = mkey(q), rkey(q)
if redis.call("EXISTS", mk) == 0 then return {"missing"} end
local raw = redis.call("HGET", rk, rid)
if not raw then return {"missing"} end
local r = cjson.decode(raw)
if r.state ~= "pending" or tonumber(r.attempt) ~= tonumber(ARGV[4]) then return {"stale", raw} end
r.attempt = tonumber(r.attempt) + 1
for field, value in pairs(cjson.decode(ARGV[6])) do r[field] = value end
local encoded = cjson.encode(r)
redis.call("HSET", rk, rid, encoded)
-- replaces the job a scheduler may still hold a lease on: its complete() then finds another token
local id = q .. ":" .. rid
drop_job(id)
local jk = jkey(id)
redis.call("HSET", jk, "kind", "retry", "queueId", q, "rid", rid, "recipient", cjson.encode(r),
  "receivedAt", redis.call("HGET", mk, "receivedAt"), "traceparent", redis.call("HGET", mk, "traceparent") or "")
redis.call("ZADD", DUE, ARGV[5], id)
local delay = "0"
if ARGV[7] == "1" and redis.call("HGET", mk, "notices") == "1" and redis.call("HGET", mk, "delayNotified") ~= "1" then
  redis.call("HSET", mk, "delayNotified", "1")
  local did = q .. ":dsn-delay"
  redis.call("HSET", jkey(did), "kind", "dsn", "dsnKind", "delay", "queueId", q)
  redis.call("ZADD", TASKS, now, did)
  delay = "1"
end
return {"ok", encoded, delay}
`;

/**
 * ARGV: prefix, now, limit, leaseMs. Moves due jobs (internal tasks first) to the lease set and
 * returns {id, {field, value, ...}} for each.
 */
export const CLAIM = `${COMMON}
local now = ARGV[2]
local left = tonumber(ARGV[3])
local until_ = tonumber(now) + tonumber(ARGV[4])
local out = {}
for _, set in ipairs({TASKS, DUE}) do
  if left <= 0 then break end
  local ids = redis.call("ZRANGEBYSCORE", set, "-inf", now, "LIMIT", 0, left, "WITHSCORES")
  for i = 1, #ids, 2 do
    local id = ids[i]
    redis.call("ZREM", set, id)
    local jk = jkey(id)
    if set == DUE and is_held(jk) then
      -- on hold: kept aside, not dispatched, until released
      redis.call("ZADD", HELD, ids[i + 1], id)
      redis.call("HSET", jk, "held", "1")
    elseif redis.call("EXISTS", jk) == 1 then
      local token = tostring(redis.call("INCR", P .. "seq"))
      redis.call("HSET", jk, "lease", token)
      redis.call("ZADD", LEASE, until_, id)
      out[#out + 1] = {id, redis.call("HGETALL", jk)}
      left = left - 1
    end
  end
end
return out
`;

/** ARGV: prefix, now. Returns how many leases went back. */
export const RELEASE_EXPIRED = `${COMMON}
local now = ARGV[2]
local ids = redis.call("ZRANGEBYSCORE", LEASE, "-inf", now)
for _, id in ipairs(ids) do
  redis.call("ZREM", LEASE, id)
  local jk = jkey(id)
  local kind = redis.call("HGET", jk, "kind")
  if kind then
    redis.call("HDEL", jk, "lease")
    redis.call("ZADD", kind == "retry" and DUE or TASKS, now, id)
  end
end
return #ids
`;

/** ARGV: prefix, id1, token1, id2, token2, ... Removes jobs still held under those leases. */
export const COMPLETE = `${COMMON}
local n = 0
for i = 2, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if redis.call("HGET", jkey(id), "lease") == token then
    redis.call("DEL", jkey(id))
    redis.call("ZREM", LEASE, id)
    n = n + 1
  end
end
return n
`;

/**
 * ARGV: prefix, now, nSlots, [site, token, "<seq> <dispatchId>"] × nSlots, id1, token1, seq1, id2,
 * token2, seq2, ... Records which request holds each destination slot, then completes re-dispatched
 * retry jobs still held under those leases; a recipient still pending on the attempt its job
 * dispatched then waits for a result from now on (DISPATCHED), on the request stored at that stream
 * sequence ("" = unknown). Returns how many jobs were removed.
 */
export const COMPLETE_DISPATCHED = `${COMMON}${SITE}
local now = ARGV[2]
local n = 0
local first = 4 + 3 * tonumber(ARGV[3])
for i = 4, first - 1, 3 do record_slot(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
for i = first, #ARGV, 3 do
  local id, token, seq = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local jk = jkey(id)
  if redis.call("HGET", jk, "lease") == token then
    local f = redis.call("HMGET", jk, "queueId", "rid", "recipient")
    redis.call("DEL", jk)
    redis.call("ZREM", LEASE, id)
    n = n + 1
    local raw = f[1] and f[2] and redis.call("HGET", rkey(f[1]), f[2])
    if raw and f[3] then
      local r = cjson.decode(raw)
      if r.state == "pending" and tonumber(r.attempt) == tonumber(cjson.decode(f[3]).attempt) then
        redis.call("ZADD", DISPATCHED, now, id)
        if seq ~= "" then redis.call("HSET", DSEQ, id, seq) else redis.call("HDEL", DSEQ, id) end
      end
    end
  end
end
return n
`;

/**
 * ARGV: prefix, now, dispatchedBefore, limit, leaseMs, lastReplyJson[, id1, id2, ...]. The watchdog:
 * recipients still pending, with no retry job, dispatched at or before `dispatchedBefore` (their worker
 * never reported): the oldest `limit` entries, or only the given ids (each still re-checked against
 * `dispatchedBefore`, as another replica may have found its request still queued and pushed it back).
 * Each one moves on to its next attempt (so a late status for the old one is stale) with `lastReply`,
 * as a retry job leased to the caller, marked `stale` = its dispatch time (ms). Entries that need
 * nothing (final, gone, or with a job) are dropped. Returns {id, {field, value, ...}}.
 */
export const CLAIM_STALE = `${COMMON}
local now = ARGV[2]
local until_ = tonumber(now) + tonumber(ARGV[5])
local out = {}
local rows = {}
if #ARGV > 6 then
  for i = 7, #ARGV do
    local score = redis.call("ZSCORE", DISPATCHED, ARGV[i])
    if score and tonumber(score) <= tonumber(ARGV[3]) then
      rows[#rows + 1] = ARGV[i]
      rows[#rows + 1] = score
    end
  end
else
  rows = redis.call("ZRANGEBYSCORE", DISPATCHED, "-inf", ARGV[3], "WITHSCORES", "LIMIT", 0, tonumber(ARGV[4]))
end
for i = 1, #rows, 2 do
  local id, since = rows[i], rows[i + 1]
  undispatch(id)
  -- queue ids have no colon: the rid is everything after the first one
  local sep = string.find(id, ":", 1, true)
  if sep then
    local q, rid = string.sub(id, 1, sep - 1), string.sub(id, sep + 1)
    local mk, rk, jk = mkey(q), rkey(q), jkey(id)
    local raw = redis.call("HGET", rk, rid)
    if raw and redis.call("EXISTS", mk) == 1 and redis.call("EXISTS", jk) == 0 then
      local r = cjson.decode(raw)
      if r.state == "pending" then
        r.attempt = tonumber(r.attempt) + 1
        r.lastReply = cjson.decode(ARGV[6])
        local encoded = cjson.encode(r)
        redis.call("HSET", rk, rid, encoded)
        local token = tostring(redis.call("INCR", P .. "seq"))
        redis.call("HSET", jk, "kind", "retry", "queueId", q, "rid", rid, "recipient", encoded,
          "receivedAt", redis.call("HGET", mk, "receivedAt"), "traceparent", redis.call("HGET", mk, "traceparent") or "",
          "stale", since, "lease", token)
        redis.call("ZADD", LEASE, until_, id)
        out[#out + 1] = {id, redis.call("HGETALL", jk)}
      end
    end
  end
end
return out
`;

/**
 * ARGV: prefix, queueId, nSlots, [site, token, "<seq> <dispatchId>"] × nSlots, rid1, seq1, rid2, seq2,
 * ... Records which request holds each destination slot (while it still does), and the stream
 * sequence of the request each recipient was just dispatched in, for those still waiting for a result
 * (a fast worker's status may have finished the recipient already). Returns how many were recorded.
 */
export const RECORD_DISPATCH = `${COMMON}${SITE}
local q = ARGV[2]
local n = 0
local first = 4 + 3 * tonumber(ARGV[3])
for i = 4, first - 1, 3 do record_slot(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
for i = first, #ARGV, 2 do
  local id = q .. ":" .. ARGV[i]
  if redis.call("ZSCORE", DISPATCHED, id) then
    redis.call("HSET", DSEQ, id, ARGV[i + 1])
    n = n + 1
  end
end
return n
`;

/**
 * ARGV: prefix, now, id1, token1, id2, token2, ... Extends the leases of jobs still held under those
 * tokens to ARGV[2]; returns the ids still held (a job missing from the answer was lost: another
 * replica may have taken it).
 */
export const RENEW_LEASES = `${COMMON}
local out = {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if redis.call("HGET", jkey(id), "lease") == token then
    redis.call("ZADD", LEASE, "XX", ARGV[2], id)
    out[#out + 1] = id
  end
end
return out
`;

/**
 * ARGV: prefix, id, token, fieldsJson. Stores fields the job does not have yet (first writer wins),
 * so a retried task reuses what the first try chose. Returns the job's fields, or nil when the lease
 * was lost.
 */
export const PREPARE_TASK = `${COMMON}
local jk = jkey(ARGV[2])
if redis.call("HGET", jk, "lease") ~= ARGV[3] then return false end
for field, value in pairs(cjson.decode(ARGV[4])) do redis.call("HSETNX", jk, field, value) end
return redis.call("HGETALL", jk)
`;

/**
 * ARGV: prefix, id, token, queueId, dsnKind, ridsJson, now, dsnBatchDelayMs, tombstoneTtlMs
 * Returns {"stale"} | {"ok", finalizedReceivedAt|""}
 */
export const COMPLETE_DSN = `${COMMON}
local id, q, now = ARGV[2], ARGV[4], ARGV[7]
local jk = jkey(id)
if redis.call("HGET", jk, "lease") ~= ARGV[3] then return {"stale"} end
redis.call("DEL", jk)
redis.call("ZREM", LEASE, id)
if ARGV[5] == "failure" then
  for _, rid in ipairs(cjson.decode(ARGV[6])) do redis.call("SREM", bkey(q), rid) end
  if redis.call("SCARD", bkey(q)) > 0 then ensure_failure_dsn(q, tonumber(now) + tonumber(ARGV[8])) end
end
local fin = finalize(q, now, ARGV[9])
return {"ok", fin or ""}
`;

/** ARGV: prefix, id, action, now. Returns "marked" | "in-flight" | "not-found". */
export const MARK = `${COMMON}
local id = ARGV[2]
local jk = jkey(id)
if redis.call("HGET", jk, "kind") ~= "retry" then return "not-found" end
if redis.call("ZSCORE", LEASE, id) then return "in-flight" end
-- a recipient waiting for a destination slot leaves the wait list: the mark is acted on now
local site = redis.call("HGET", jk, "site")
if site then redis.call("ZREM", P .. "site:" .. site .. ":wait", id) end
redis.call("HSET", jk, "mark", ARGV[3])
-- a held recipient is acted on too: the operator asked for this one
redis.call("ZREM", HELD, id)
redis.call("HDEL", jk, "held")
redis.call("ZADD", DUE, ARGV[4], id)
return "marked"
`;

/** ARGV: prefix, now. Makes every scheduled retry due now; returns how many moved. */
export const FLUSH = `${COMMON}
local ids = redis.call("ZRANGEBYSCORE", DUE, "(" .. ARGV[2], "+inf")
for _, id in ipairs(ids) do redis.call("ZADD", DUE, "XX", ARGV[2], id) end
return #ids
`;

/**
 * ARGV: prefix, rule ("all" | "d:<domain>" | "m:<queue id>"), now. Puts the rule in force and moves
 * the scheduled retries it holds from DUE to HELD at once (the others are held when they come due).
 * Returns how many moved.
 */
export const HOLD = `${COMMON}
redis.call("HSET", HOLDS, ARGV[2], ARGV[3])
local n = 0
local ids = redis.call("ZRANGE", DUE, 0, -1, "WITHSCORES")
for i = 1, #ids, 2 do
  local jk = jkey(ids[i])
  if is_held(jk) then
    redis.call("ZREM", DUE, ids[i])
    redis.call("ZADD", HELD, ids[i + 1], ids[i])
    redis.call("HSET", jk, "held", "1")
    n = n + 1
  end
end
return n
`;

/**
 * ARGV: prefix, rule, now. Ends the rule, and puts back in the schedule every held retry no other
 * rule still holds: due when it was due, or now when that time has passed. Returns how many.
 */
export const RELEASE_HOLD = `${COMMON}
redis.call("HDEL", HOLDS, ARGV[2])
local now = tonumber(ARGV[3])
local n = 0
local ids = redis.call("ZRANGE", HELD, 0, -1, "WITHSCORES")
for i = 1, #ids, 2 do
  local id = ids[i]
  local jk = jkey(id)
  if redis.call("EXISTS", jk) == 0 then
    redis.call("ZREM", HELD, id)
  elseif not is_held(jk) then
    redis.call("ZREM", HELD, id)
    redis.call("HDEL", jk, "held")
    local due
    if tonumber(ids[i + 1]) > now then
      due = ids[i + 1] -- its next attempt is still ahead: it keeps that time
    else
      due = ARGV[3] -- its time came while it was held: due now
    end
    redis.call("ZADD", DUE, due, id)
    n = n + 1
  end
end
return n
`;

/**
 * First attempts to a held destination (or while everything is held). ARGV: prefix, queueId, now,
 * rid1, rid2, ... Recipients still pending with no job of their own become held retry jobs on their
 * first attempt. Returns how many.
 */
export const HOLD_PENDING = `${COMMON}
local q, now = ARGV[2], ARGV[3]
local mk, rk = mkey(q), rkey(q)
if redis.call("EXISTS", mk) == 0 then return 0 end
local received, tp = redis.call("HGET", mk, "receivedAt"), redis.call("HGET", mk, "traceparent") or ""
local n = 0
for i = 4, #ARGV do
  local id = q .. ":" .. ARGV[i]
  local raw = redis.call("HGET", rk, ARGV[i])
  if raw and redis.call("EXISTS", jkey(id)) == 0 and cjson.decode(raw).state == "pending" then
    redis.call("HSET", jkey(id), "kind", "retry", "queueId", q, "rid", ARGV[i], "recipient", raw,
      "receivedAt", received, "traceparent", tp, "held", "1")
    redis.call("ZADD", HELD, now, id)
    undispatch(id)
    n = n + 1
  end
end
return n
`;
