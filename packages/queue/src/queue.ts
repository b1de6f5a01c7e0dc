import { BodyRef, Reply } from "@mailpipe/contracts";
import type { Redis, Result } from "ioredis";
import {
  CLAIM,
  CLAIM_STALE,
  COMPLETE,
  COMPLETE_DISPATCHED,
  COMPLETE_DSN,
  CREATE_MESSAGE,
  FINISH_BY_ADDRESS,
  FINISH_RECIPIENT,
  FLUSH,
  HOLD,
  HOLD_PENDING,
  MARK,
  PREPARE_TASK,
  RECORD_DISPATCH,
  RELEASE_EXPIRED,
  RELEASE_HOLD,
  RENEW_LEASES,
  SCHEDULE_RETRY,
} from "./scripts.ts";
import type {
  ClaimedJob,
  CreateResult,
  FinalState,
  FinishResult,
  MessageInput,
  MessageRecord,
  MessageState,
  OutcomePatch,
  QueueStats,
  RecipientRecord,
  RetryJob,
  ScheduledEntry,
  ScheduleResult,
  SlotRef,
  SlotRequest,
  SpoolLocation,
  StaleCandidate,
} from "./types.ts";

type Arg = string | number;

declare module "ioredis" {
  interface RedisCommander<Context> {
    mpCreateMessage(...args: Arg[]): Result<string[], Context>;
    mpFinishRecipient(...args: Arg[]): Result<string[], Context>;
    mpFinishByAddress(...args: Arg[]): Result<string[], Context>;
    mpScheduleRetry(...args: Arg[]): Result<string[], Context>;
    mpClaim(...args: Arg[]): Result<[string, string[]][], Context>;
    mpClaimStale(...args: Arg[]): Result<[string, string[]][], Context>;
    mpCompleteDispatched(...args: Arg[]): Result<number, Context>;
    mpReleaseExpired(...args: Arg[]): Result<number, Context>;
    mpComplete(...args: Arg[]): Result<number, Context>;
    mpPrepareTask(...args: Arg[]): Result<string[] | null, Context>;
    mpCompleteDsn(...args: Arg[]): Result<string[], Context>;
    mpMark(...args: Arg[]): Result<string, Context>;
    mpFlush(...args: Arg[]): Result<number, Context>;
    mpHold(...args: Arg[]): Result<number, Context>;
    mpReleaseHold(...args: Arg[]): Result<number, Context>;
    mpHoldPending(...args: Arg[]): Result<number, Context>;
    mpRecordDispatch(...args: Arg[]): Result<number, Context>;
    mpRenewLeases(...args: Arg[]): Result<string[], Context>;
  }
}

const COMMANDS = {
  mpCreateMessage: CREATE_MESSAGE,
  mpFinishRecipient: FINISH_RECIPIENT,
  mpFinishByAddress: FINISH_BY_ADDRESS,
  mpScheduleRetry: SCHEDULE_RETRY,
  mpClaim: CLAIM,
  mpClaimStale: CLAIM_STALE,
  mpCompleteDispatched: COMPLETE_DISPATCHED,
  mpReleaseExpired: RELEASE_EXPIRED,
  mpComplete: COMPLETE,
  mpPrepareTask: PREPARE_TASK,
  mpCompleteDsn: COMPLETE_DSN,
  mpMark: MARK,
  mpFlush: FLUSH,
  mpHold: HOLD,
  mpReleaseHold: RELEASE_HOLD,
  mpHoldPending: HOLD_PENDING,
  mpRecordDispatch: RECORD_DISPATCH,
  mpRenewLeases: RENEW_LEASES,
} as const;

export const DEFAULT_PREFIX = "mailpipe:";

/** What `mailctl queue hold` holds: one message, one destination domain, or everything. */
export type HoldRule =
  | { kind: "all" }
  | { kind: "destination"; domain: string }
  | { kind: "message"; queueId: string };

function holdKey(rule: HoldRule): string {
  return rule.kind === "all"
    ? "all"
    : rule.kind === "destination"
      ? `d:${rule.domain.toLowerCase()}`
      : `m:${rule.queueId}`;
}

export interface MailQueueOptions {
  /** key prefix; the router and mailctl must use the same one */
  prefix?: string;
  /** how long a finished message's tombstone stops a redelivered copy from being routed again */
  tombstoneTtlMs?: number;
  /** bounces of one message within this time share one failure DSN */
  dsnBatchDelayMs?: number;
}

export class QueueDataError extends Error {
  override name = "QueueDataError";
}

function flatToRecord(flat: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (let i = 0; i + 1 < flat.length; i += 2) out[flat[i]!] = flat[i + 1]!;
  return out;
}

function parseRecipient(json: string): RecipientRecord {
  const r = JSON.parse(json) as RecipientRecord;
  r.attempt = Number(r.attempt);
  r.seq = Number(r.seq ?? 0);
  return r;
}

/** FINISH_RECIPIENT's reply, or FINISH_BY_ADDRESS's with the slot release's grants at the end. */
function finishResult([status, json, finalized, queued, granted]: string[]): FinishResult {
  const slots = Number(granted) > 0 ? { granted: Number(granted) } : {};
  if (status === "missing") return { status, ...slots };
  if (status === "stale") return { status, recipient: parseRecipient(json!), ...slots };
  return {
    status: "ok",
    recipient: parseRecipient(json!),
    ...(finalized ? { finalized } : {}),
    dsnQueued: queued === "1",
    ...slots,
  };
}

/** RECORD_DISPATCH's and COMPLETE_DISPATCHED's leading arguments: count, then site, token, request. */
function slotArgs(slots: readonly SlotRequest[]): Arg[] {
  return [slots.length, ...slots.flatMap((s) => [s.site, s.token, `${s.seq} ${s.dispatchId}`])];
}

function bySeq(list: RecipientRecord[]): RecipientRecord[] {
  return list.sort((a, b) => a.seq - b.seq || (a.rid < b.rid ? -1 : 1));
}

/** `<stream>:<seq>` as the queue stores a spool location. */
function parseSpool(value: string | undefined): SpoolLocation | undefined {
  if (!value) return undefined;
  const i = value.lastIndexOf(":");
  const seq = Number(value.slice(i + 1));
  return i > 0 && Number.isInteger(seq) && seq > 0 ? { stream: value.slice(0, i), seq } : undefined;
}

function iso(ms: number): string {
  return new Date(ms).toISOString();
}

/** What a retry job's recipient is for (mailctl's "destination" column). */
function destinationOf(r: RecipientRecord): string {
  return r.kind === "local" ? (r.mailbox ?? r.address) : (r.domain ?? "");
}

/**
 * The router's state in Redis: message and recipient state, and the schedule of retries and internal
 * tasks (DSN builds, body deletion). Every change that races with another router replica or with a
 * redelivered bus message is one Lua script. See README.md for the key layout.
 */
export class MailQueue {
  readonly redis: Redis;
  readonly prefix: string;
  readonly tombstoneTtlMs: number;
  readonly dsnBatchDelayMs: number;

  constructor(redis: Redis, opts: MailQueueOptions = {}) {
    this.redis = redis;
    this.prefix = opts.prefix ?? DEFAULT_PREFIX;
    this.tombstoneTtlMs = opts.tombstoneTtlMs ?? 24 * 3600_000;
    this.dsnBatchDelayMs = opts.dsnBatchDelayMs ?? 2000;
    for (const [name, lua] of Object.entries(COMMANDS)) {
      // defineCommand on a client that has it already would only replace it with the same script
      if (!(name in redis)) redis.defineCommand(name, { lua, numberOfKeys: 0 });
    }
  }

  key(kind: "message" | "recipients" | "job" | "tombstone", id: string): string {
    const letter = { message: "m", recipients: "r", job: "j", tombstone: "t" }[kind];
    return `${this.prefix}${letter}:${id}`;
  }

  // --- message state -------------------------------------------------------------------------------

  /**
   * Records a message and its recipients unless they are recorded already (a redelivered queued
   * message must not reset attempts or states): returns what Redis holds either way. Recipients
   * given as bounced are final at once and queue a failure DSN when the message allows DSNs.
   */
  async createMessage(
    message: MessageInput,
    recipients: readonly RecipientRecord[],
    now = Date.now(),
  ): Promise<CreateResult> {
    const fields: Record<string, string> = {
      queueId: message.queueId,
      mailFrom: message.mailFrom,
      receivedAt: message.receivedAt,
      receivedMs: String(Date.parse(message.receivedAt)),
      source: message.source,
      body: JSON.stringify(message.body),
      smtputf8: message.smtputf8 ? "1" : "0",
      bodyType: message.bodyType,
      notices: message.notices ? "1" : "0",
    };
    if (message.spool) fields.spool = `${message.spool.stream}:${message.spool.seq}`;
    if (message.messageId !== undefined) fields.messageId = message.messageId;
    if (message.traceparent !== undefined) fields.traceparent = message.traceparent;
    if (message.envid !== undefined) fields.envid = message.envid;
    if (message.ret !== undefined) fields.ret = message.ret;
    if (message.dsn) {
      fields.dsnOf = message.dsn.of;
      fields.dsnKind = message.dsn.kind;
    }
    const reply = await this.redis.mpCreateMessage(
      this.prefix,
      message.queueId,
      now,
      JSON.stringify(fields),
      JSON.stringify(recipients),
      this.tombstoneTtlMs,
      this.dsnBatchDelayMs,
    );
    const [status, ...rest] = reply;
    if (status === "finished" || status === "finalized") return { status };
    if (status !== "created" && status !== "exists") throw new QueueDataError(`unexpected reply ${status}`);
    return { status, recipients: bySeq(rest.map(parseRecipient)) };
  }

  /** The message and all its recipients, or null when it is unknown or finished. */
  async getMessage(queueId: string): Promise<MessageState | null> {
    const [m, r] = (await this.redis
      .multi()
      .hgetall(this.key("message", queueId))
      .hvals(this.key("recipients", queueId))
      .exec()) as [[Error | null, Record<string, string>], [Error | null, string[]]];
    if (m[0]) throw m[0];
    if (r[0]) throw r[0];
    const message = this.#parseMessage(m[1]);
    if (!message) return null;
    return { message, recipients: bySeq(r[1].map(parseRecipient)) };
  }

  /** Only the message's own fields (no recipients). */
  async getMessageRecord(queueId: string): Promise<MessageRecord | null> {
    return this.#parseMessage(await this.redis.hgetall(this.key("message", queueId)));
  }

  /** Some recipients of a message by rid (missing ones left out). */
  async getRecipients(queueId: string, rids: readonly string[]): Promise<RecipientRecord[]> {
    if (rids.length === 0) return [];
    const values = await this.redis.hmget(this.key("recipients", queueId), ...rids);
    return bySeq(values.filter((v): v is string => typeof v === "string").map(parseRecipient));
  }

  /**
   * The recipient a worker's status is about: remote recipients by address; local ones by mailbox
   * or by the copy's address (Delivered-To), whichever the worker reported.
   */
  async findRecipient(
    queueId: string,
    address: string,
    kind: "local" | "remote",
  ): Promise<RecipientRecord | null> {
    const rk = this.key("recipients", queueId);
    if (kind === "remote") {
      const v = await this.redis.hget(rk, `r:${address}`);
      return v ? parseRecipient(v) : null;
    }
    const direct = await this.redis.hget(rk, `l:${address}`);
    if (direct) return parseRecipient(direct);
    const rid = await this.redis.hget(`${this.prefix}a:${queueId}`, address);
    if (!rid) return null;
    const v = await this.redis.hget(rk, rid);
    return v ? parseRecipient(v) : null;
  }

  /** Recipients (rids) waiting for their final report: failed, or delivered with NOTIFY=SUCCESS. */
  async pendingFinalReports(queueId: string): Promise<string[]> {
    return this.redis.smembers(`${this.prefix}b:${queueId}`);
  }

  /** Whether a message finished recently (its tombstone is still there). */
  async isFinished(queueId: string): Promise<boolean> {
    return (await this.redis.exists(this.key("tombstone", queueId))) === 1;
  }

  /**
   * finishRecipient for the recipient a worker's status names (as findRecipient finds it), in one
   * round trip: a "delivered" status needs nothing else from the router. With `slot`, the request's
   * destination slot is released in the same script and handed to the site's wait list
   * (`granted`: how many waiting groups got a slot and are due in the schedule now).
   */
  async finishByAddress(
    queueId: string,
    address: string,
    kind: "local" | "remote",
    expectedAttempt: number,
    state: FinalState,
    patch: OutcomePatch,
    opts: { dsn: boolean; now?: number; slot?: SlotRef | undefined },
  ): Promise<FinishResult> {
    const reply = await this.redis.mpFinishByAddress(
      this.prefix,
      queueId,
      address,
      kind,
      expectedAttempt,
      state,
      JSON.stringify(patch),
      opts.dsn ? "1" : "0",
      opts.now ?? Date.now(),
      this.dsnBatchDelayMs,
      this.tombstoneTtlMs,
      opts.slot?.site ?? "",
      opts.slot?.token ?? "",
    );
    return finishResult(reply);
  }

  /**
   * Makes a recipient final, only if it is still pending on `expectedAttempt` (else "stale": an older
   * attempt's status, or a duplicate). Removes its retry job; with `dsn`, queues it for the message's
   * failure DSN. When it was the last open recipient and no DSN needs the body, the message is
   * finalized: state dropped, tombstone left, body deletion queued.
   */
  async finishRecipient(
    queueId: string,
    rid: string,
    expectedAttempt: number,
    state: FinalState,
    patch: OutcomePatch,
    opts: { dsn: boolean; now?: number },
  ): Promise<FinishResult> {
    const reply = await this.redis.mpFinishRecipient(
      this.prefix,
      queueId,
      rid,
      expectedAttempt,
      state,
      JSON.stringify(patch),
      opts.dsn ? "1" : "0",
      opts.now ?? Date.now(),
      this.dsnBatchDelayMs,
      this.tombstoneTtlMs,
    );
    return finishResult(reply);
  }

  /**
   * Schedules the recipient's next attempt at `dueAt`, only if it is still pending on
   * `expectedAttempt`: the attempt count goes up by one and the retry job (one per recipient) is
   * written or replaced. With `delayNotice`, queues the message's one delay DSN unless it was sent.
   */
  async scheduleRetry(
    queueId: string,
    rid: string,
    expectedAttempt: number,
    dueAt: number,
    patch: OutcomePatch,
    opts: { delayNotice: boolean; now?: number },
  ): Promise<ScheduleResult> {
    const [status, json, delay] = await this.redis.mpScheduleRetry(
      this.prefix,
      queueId,
      rid,
      expectedAttempt,
      Math.round(dueAt),
      JSON.stringify(patch),
      opts.delayNotice ? "1" : "0",
      opts.now ?? Date.now(),
    );
    if (status === "missing") return { status };
    if (status === "stale") return { status, recipient: parseRecipient(json!) };
    return { status: "ok", recipient: parseRecipient(json!), delayNoticeQueued: delay === "1" };
  }

  // --- the schedule --------------------------------------------------------------------------------

  /**
   * Atomically moves up to `limit` due jobs (internal tasks first, then retries) into the in-flight
   * set with a lease until `now + leaseMs`, and returns them. Two routers calling this at once never
   * get the same job.
   */
  async claim(now: number, limit: number, leaseMs: number): Promise<ClaimedJob[]> {
    const rows = await this.redis.mpClaim(this.prefix, now, limit, leaseMs);
    const out: ClaimedJob[] = [];
    for (const [id, flat] of rows) {
      const job = this.#parseJob(id, flatToRecord(flat));
      // a job this version cannot read stays leased and comes back after its lease, visible in stats
      if (job) out.push(job);
    }
    return out;
  }

  #parseJob(id: string, f: Record<string, string>): ClaimedJob | null {
    try {
      const base = { id, lease: f.lease ?? "", queueId: f.queueId ?? "" };
      if (f.kind === "retry" && f.recipient) {
        return {
          ...base,
          kind: "retry",
          recipient: parseRecipient(f.recipient),
          receivedAt: f.receivedAt ?? "",
          ...(f.traceparent ? { traceparent: f.traceparent } : {}),
          ...(f.mark === "bounce" || f.mark === "drop" ? { mark: f.mark } : {}),
          ...(f.stale ? { stale: { dispatchedAt: iso(Number(f.stale)) } } : {}),
          ...(f.slot && f.site ? { slot: { site: f.site, token: f.slot } } : {}),
        };
      }
      if (f.kind === "dsn" && (f.dsnKind === "failure" || f.dsnKind === "delay")) {
        const { kind: _k, dsnKind, queueId: _q, lease: _l, ...prepared } = f;
        return { ...base, kind: "dsn", dsnKind, prepared };
      }
      if (f.kind === "gc" && f.body) {
        const spool = parseSpool(f.spool);
        return { ...base, kind: "gc", body: BodyRef.parse(JSON.parse(f.body)), ...(spool ? { spool } : {}) };
      }
      return null;
    } catch {
      return null;
    }
  }

  /**
   * Extends the leases of claimed jobs to `until` (ms), only while the caller still holds them;
   * returns the ids it still holds. A job missing from the answer lost its lease (another replica may
   * be working on it): its work must not be done again.
   */
  async renewLeases(jobs: readonly { id: string; lease: string }[], until: number): Promise<Set<string>> {
    if (jobs.length === 0) return new Set();
    const held = await this.redis.mpRenewLeases(
      this.prefix,
      Math.round(until),
      ...jobs.flatMap((j) => [j.id, j.lease]),
    );
    return new Set(held);
  }

  /**
   * Records the MAIL_DELIVER stream sequence of the request that just dispatched these recipients
   * of a message (first attempts; re-dispatches record it in completeDispatched), for the ones still
   * waiting for a result. The watchdog looks it up before dispatching a silent recipient again.
   * `slots`: the destination slots these requests hold, and the request each one went out in.
   */
  async recordDispatch(
    queueId: string,
    entries: readonly { rid: string; seq: number }[],
    slots: readonly SlotRequest[] = [],
  ): Promise<number> {
    if (entries.length === 0 && slots.length === 0) return 0;
    return this.redis.mpRecordDispatch(
      this.prefix,
      queueId,
      ...slotArgs(slots),
      ...entries.flatMap((e) => [e.rid, e.seq]),
    );
  }

  /**
   * Up to `limit` recipients waiting for a result since `dispatchedBefore` or earlier, oldest first,
   * with the stream sequence of their request when it was recorded. Only a look: claimStale() decides.
   */
  async staleCandidates(dispatchedBefore: number, limit: number): Promise<StaleCandidate[]> {
    const flat = await this.redis.zrangebyscore(
      `${this.prefix}dispatched`,
      "-inf",
      Math.floor(dispatchedBefore),
      "WITHSCORES",
      "LIMIT",
      0,
      limit,
    );
    const rows: { id: string; at: number }[] = [];
    for (let i = 0; i + 1 < flat.length; i += 2) rows.push({ id: flat[i]!, at: Number(flat[i + 1]) });
    if (rows.length === 0) return [];
    const seqs = await this.redis.hmget(`${this.prefix}dseq`, ...rows.map((r) => r.id));
    return rows.map(({ id, at }, i) => {
      const sep = id.indexOf(":");
      const seq = Number(seqs[i] ?? Number.NaN);
      return {
        id,
        queueId: id.slice(0, sep),
        rid: id.slice(sep + 1),
        dispatchedAt: at,
        ...(Number.isSafeInteger(seq) && seq > 0 ? { seq } : {}),
      };
    });
  }

  /**
   * Restarts the wait of recipients whose request is still queued (their work is not lost): they are
   * looked at again once another STALE_DISPATCH has passed. Entries that went meanwhile stay gone.
   */
  async touchDispatched(ids: readonly string[], now: number): Promise<number> {
    if (ids.length === 0) return 0;
    return this.redis.zadd(
      `${this.prefix}dispatched`,
      "XX",
      "GT",
      "CH",
      ...ids.flatMap((id) => [Math.round(now), id]),
    );
  }

  /**
   * The watchdog's claim: up to `limit` recipients still pending with no retry job, dispatched at
   * or before `dispatchedBefore` and never heard of since (the request or its status was lost, or a
   * worker dropped it); with `ids`, only those of them. Each one atomically moves on to its next
   * attempt with `lastReply`, so a late status for the silent attempt is stale, and comes back as a
   * retry job leased until `now + leaseMs` with `stale` set. Two routers calling this at once never
   * get the same recipient, and an entry another one touched since (touchDispatched) is not taken.
   */
  async claimStale(
    now: number,
    dispatchedBefore: number,
    limit: number,
    leaseMs: number,
    lastReply: Reply,
    ids?: readonly string[],
  ): Promise<RetryJob[]> {
    if (ids?.length === 0) return [];
    const rows = await this.redis.mpClaimStale(
      this.prefix,
      now,
      Math.floor(dispatchedBefore),
      limit,
      leaseMs,
      JSON.stringify(lastReply),
      ...(ids ?? []),
    );
    const out: RetryJob[] = [];
    for (const [id, flat] of rows) {
      const job = this.#parseJob(id, flatToRecord(flat));
      if (job?.kind === "retry") out.push(job);
    }
    return out;
  }

  /**
   * Completes retry jobs whose re-dispatch was acked (like complete()), and starts waiting for the
   * result of each recipient still pending on the attempt its job dispatched: from `now` on, the
   * watchdog (claimStale) counts its silence. `seqs` maps a job id to the MAIL_DELIVER stream
   * sequence of the request it went out in; `slots` as for recordDispatch().
   */
  async completeDispatched(
    jobs: readonly { id: string; lease: string }[],
    now = Date.now(),
    seqs: ReadonlyMap<string, number> = new Map(),
    slots: readonly SlotRequest[] = [],
  ): Promise<number> {
    if (jobs.length === 0) return 0;
    return this.redis.mpCompleteDispatched(
      this.prefix,
      now,
      ...slotArgs(slots),
      ...jobs.flatMap((j) => [j.id, j.lease, seqs.get(j.id) ?? ""]),
    );
  }

  /** The MAIL_DELIVER stream sequence a waiting recipient's request was stored at, or null. */
  async dispatchSeq(queueId: string, rid: string): Promise<number | null> {
    const v = await this.redis.hget(`${this.prefix}dseq`, `${queueId}:${rid}`);
    return v === null ? null : Number(v);
  }

  /** When a recipient was last handed to a worker without a result since (ms), or null. */
  async dispatchedAt(queueId: string, rid: string): Promise<number | null> {
    const score = await this.redis.zscore(`${this.prefix}dispatched`, `${queueId}:${rid}`);
    return score === null ? null : Number(score);
  }

  /** Removes jobs whose work is done (re-dispatch acked), as long as the caller's lease still holds them. */
  async complete(jobs: readonly { id: string; lease: string }[]): Promise<number> {
    if (jobs.length === 0) return 0;
    return this.redis.mpComplete(this.prefix, ...jobs.flatMap((j) => [j.id, j.lease]));
  }

  /** Puts jobs whose lease ran out (their router died or stalled) back in the due set, due now. */
  async releaseExpiredLeases(now = Date.now()): Promise<number> {
    return this.redis.mpReleaseExpired(this.prefix, now);
  }

  /**
   * Stores `fields` on a claimed task unless it has them already, and returns the task's fields: a
   * task retried after a crash reuses the first try's choices (e.g. the DSN's queue ID). Null when
   * the lease was lost.
   */
  async prepareTask(
    job: { id: string; lease: string },
    fields: Record<string, string>,
  ): Promise<Record<string, string> | null> {
    const flat = await this.redis.mpPrepareTask(this.prefix, job.id, job.lease, JSON.stringify(fields));
    return flat ? flatToRecord(flat) : null;
  }

  /**
   * Completes a DSN task: the reported recipients leave the message's DSN set (new bounces that
   * arrived meanwhile get a new task), and the message is finalized when nothing else is open.
   */
  async completeDsn(
    job: { id: string; lease: string; queueId: string },
    kind: "failure" | "delay",
    rids: readonly string[],
    now = Date.now(),
  ): Promise<{ status: "stale" } | { status: "ok"; finalized?: string }> {
    const [status, finalized] = await this.redis.mpCompleteDsn(
      this.prefix,
      job.id,
      job.lease,
      job.queueId,
      kind,
      JSON.stringify(rids),
      now,
      this.dsnBatchDelayMs,
      this.tombstoneTtlMs,
    );
    if (status === "stale") return { status };
    return { status: "ok", ...(finalized ? { finalized } : {}) };
  }

  // --- operator functions (mailctl) ----------------------------------------------------------------

  /** Scheduled retries, soonest first. */
  async listScheduled({ limit = 100 }: { limit?: number } = {}): Promise<ScheduledEntry[]> {
    const [flat, heldFlat] = await Promise.all(
      ["due", "held"].map((set) =>
        this.redis.zrange(`${this.prefix}${set}`, 0, String(Math.max(0, limit - 1)), "WITHSCORES"),
      ),
    );
    const ids: { id: string; due: number; held?: boolean }[] = [];
    for (let i = 0; i + 1 < flat!.length; i += 2) ids.push({ id: flat![i]!, due: Number(flat![i + 1]) });
    for (let i = 0; i + 1 < heldFlat!.length; i += 2) {
      ids.push({ id: heldFlat![i]!, due: Number(heldFlat![i + 1]), held: true });
    }
    if (ids.length === 0) return [];
    const pipe = this.redis.pipeline();
    for (const { id } of ids) pipe.hgetall(this.key("job", id));
    const rows = (await pipe.exec()) ?? [];
    const out: ScheduledEntry[] = [];
    ids.forEach(({ id, due, held }, i) => {
      const f = rows[i]?.[1] as Record<string, string> | undefined;
      if (!f?.recipient) return;
      const r = parseRecipient(f.recipient);
      const lastReply = r.lastReply && Reply.safeParse(r.lastReply).success ? r.lastReply : undefined;
      out.push({
        id,
        queueId: f.queueId ?? "",
        recipient: r.address,
        kind: r.kind === "local" ? "local" : "remote",
        destination: destinationOf(r),
        attempts: r.attempt - 1,
        nextAttemptAt: iso(due),
        ...(lastReply ? { lastReply } : {}),
        receivedAt: f.receivedAt ?? "",
        ...(f.mark === "bounce" || f.mark === "drop" ? { mark: f.mark } : {}),
        ...(held ? { held: true } : {}),
      });
    });
    return out;
  }

  /**
   * Holds retries (mailctl queue hold): of one message, of one destination domain, or all. The rule
   * stays in Redis until released, so it outlives router restarts; scheduled retries it covers move
   * aside now, later ones when they come due, and the router keeps new messages' first attempts to a
   * held destination (or all) aside too. Returns how many scheduled retries moved now.
   */
  async hold(rule: HoldRule, now = Date.now()): Promise<number> {
    return this.redis.mpHold(this.prefix, holdKey(rule), now);
  }

  /** Ends a hold; the retries no other hold covers go back to the schedule. Returns how many. */
  async release(rule: HoldRule, now = Date.now()): Promise<number> {
    return this.redis.mpReleaseHold(this.prefix, holdKey(rule), now);
  }

  /** The holds in force. */
  async holds(): Promise<HoldRule[]> {
    const keys = await this.redis.hkeys(`${this.prefix}holds`);
    return keys.flatMap((k): HoldRule[] =>
      k === "all"
        ? [{ kind: "all" }]
        : k.startsWith("d:")
          ? [{ kind: "destination", domain: k.slice(2) }]
          : k.startsWith("m:")
            ? [{ kind: "message", queueId: k.slice(2) }]
            : [],
    );
  }

  /** First attempts the router keeps aside: pending recipients become held retry jobs. */
  async holdPending(queueId: string, rids: readonly string[], now = Date.now()): Promise<number> {
    if (rids.length === 0) return 0;
    return this.redis.mpHoldPending(this.prefix, queueId, now, ...rids);
  }

  /** Makes every scheduled retry due now; returns how many were waiting. */
  async flushScheduled(now = Date.now()): Promise<number> {
    return this.redis.mpFlush(this.prefix, now);
  }

  /**
   * Marks a scheduled retry for the router and makes it due now: "bounce" ends the recipient with a
   * DSN to the sender, "drop" ends it without one. A job a router is dispatching right now is left
   * alone ("in-flight"): try again once it is back in the schedule.
   */
  async deleteScheduled(
    id: string,
    { action }: { action: "bounce" | "drop" },
    now = Date.now(),
  ): Promise<"marked" | "in-flight" | "not-found"> {
    const r = await this.redis.mpMark(this.prefix, id, action, now);
    if (r !== "marked" && r !== "in-flight" && r !== "not-found") throw new QueueDataError(`unexpected ${r}`);
    return r;
  }

  async stats(): Promise<QueueStats> {
    const p = this.prefix;
    const rows = (await this.redis
      .multi()
      .zcard(`${p}due`)
      .zcard(`${p}lease`)
      .zrange(`${p}due`, 0, "0", "WITHSCORES")
      .zrange(`${p}messages`, 0, "0", "WITHSCORES")
      .exec()) as [Error | null, unknown][];
    for (const [err] of rows) if (err) throw err;
    const due = rows[2]![1] as string[];
    const oldest = rows[3]![1] as string[];
    return {
      scheduled: rows[0]![1] as number,
      inFlight: rows[1]![1] as number,
      oldestDueAt: due.length >= 2 ? iso(Number(due[1])) : null,
      oldestReceivedAt: oldest.length >= 2 ? iso(Number(oldest[1])) : null,
    };
  }

  #parseMessage(f: Record<string, string>): MessageRecord | null {
    if (!f.queueId) return null;
    const source = f.source;
    if (source !== "mx" && source !== "msa" && source !== "dsn" && source !== "report") {
      throw new QueueDataError(`message ${f.queueId} has an unknown source ${source}`);
    }
    return {
      queueId: f.queueId,
      mailFrom: f.mailFrom ?? "",
      receivedAt: f.receivedAt ?? "",
      source,
      body: BodyRef.parse(JSON.parse(f.body ?? "null")),
      ...(parseSpool(f.spool) ? { spool: parseSpool(f.spool)! } : {}),
      ...(f.messageId ? { messageId: f.messageId } : {}),
      ...(f.traceparent ? { traceparent: f.traceparent } : {}),
      smtputf8: f.smtputf8 === "1",
      bodyType: f.bodyType === "8BITMIME" ? "8BITMIME" : "7BIT",
      ...(f.dsnOf && (f.dsnKind === "failure" || f.dsnKind === "delay" || f.dsnKind === "success")
        ? { dsn: { of: f.dsnOf, kind: f.dsnKind } }
        : {}),
      notices: f.notices === "1",
      ...(f.envid ? { envid: f.envid } : {}),
      ...(f.ret === "FULL" || f.ret === "HDRS" ? { ret: f.ret } : {}),
      delayNotified: f.delayNotified === "1",
      open: Number(f.open ?? 0),
      total: Number(f.total ?? 0),
    };
  }
}
