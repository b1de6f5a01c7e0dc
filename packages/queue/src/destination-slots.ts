import { createHash } from "node:crypto";
import type { Redis, Result } from "ioredis";
import { COMMON } from "./scripts.ts";
import {
  ADMIT,
  ADMIT_JOBS,
  GRANT_DUE,
  RELEASE_SLOTS,
  RENEW_SLOT,
  SETTLE_SLOTS,
  SITE_STATS,
} from "./site-scripts.ts";
import type { SlotRef } from "./types.ts";

type Arg = string | number;

declare module "ioredis" {
  interface RedisCommander<Context> {
    mpAdmit(...args: Arg[]): Result<string[], Context>;
    mpAdmitJobs(...args: Arg[]): Result<string[], Context>;
    mpReleaseSlots(...args: Arg[]): Result<number, Context>;
    mpGrantDue(...args: Arg[]): Result<string[], Context>;
    mpSettleSlots(...args: Arg[]): Result<number, Context>;
    mpRenewSlot(...args: Arg[]): Result<string, Context>;
    mpSiteStats(...args: Arg[]): Result<string[], Context>;
  }
}

const COMMANDS = {
  mpAdmit: ADMIT(COMMON),
  mpAdmitJobs: ADMIT_JOBS(COMMON),
  mpReleaseSlots: RELEASE_SLOTS(COMMON),
  mpGrantDue: GRANT_DUE(COMMON),
  mpSettleSlots: SETTLE_SLOTS(COMMON),
  mpRenewSlot: RENEW_SLOT(COMMON),
  mpSiteStats: SITE_STATS(COMMON),
} as const;

/** A destination site: the set of MX hosts a domain resolves to. */
export interface Site {
  /** 16 hex digits: a digest of the sorted, lower-cased MX host names */
  id: string;
  /** readable, for logs and metrics: the MX host names */
  label: string;
}

const LABEL_MAX = 200;

/**
 * The site of a destination: its MX host names (an implicit MX is the domain itself), lower-cased,
 * without a trailing dot, de-duplicated and sorted. Domains served by the same hosts share a site,
 * and with it one limit (as KumoMTA's "site name" does).
 */
export function siteOf(exchanges: readonly string[]): Site {
  const names = [...new Set(exchanges.map((e) => e.toLowerCase().replace(/\.$/, "")))].sort();
  const id = createHash("sha256").update(names.join("\n")).digest("hex").slice(0, 16);
  let label = names.join(",");
  if (label.length > LABEL_MAX) label = `${label.slice(0, LABEL_MAX - 1)}…`;
  return { id, label };
}

/** The limits in force for a site, and how specific the rule that set them is. */
export interface SitePolicy {
  /** SMTP transactions in flight at once, across every delivery worker */
  connections: number;
  /** messages (transactions started) per period; absent: no rate limit */
  rate?: { messages: number; perMs: number } | undefined;
  /** 0 default, 1 an MX host pattern, 2 a domain: a more specific rule wins for a shared site */
  priority: 0 | 1 | 2;
}

export type AdmitResult =
  /** the caller holds a slot under its token: publish */
  | { status: "ok"; granted: number }
  /** no slot (or no rate token): the recipients wait in the site's wait list */
  | { status: "wait"; granted: number; waiting: number };

/** An expired slot whose request was recorded: the router looks it up in MAIL_DELIVER. */
export interface SuspectSlot extends SlotRef {
  seq: number;
  dispatchId: string;
}

export interface SiteStats {
  site: string;
  label: string;
  /** slots held (transactions in flight, or requests on their way to a worker) */
  inUse: number;
  /** recipients waiting for a slot */
  waiting: number;
  limit: number;
}

export interface DestinationSlotsOptions {
  /** key prefix, the same as the MailQueue's */
  prefix?: string;
  /** how long a slot is held without being renewed */
  leaseMs?: number;
}

/**
 * Destination limits shared by every router and delivery replica through Redis: per site, slots
 * (SMTP transactions in flight) with leases, a message rate, and a wait list of recipients that found
 * no slot. Each call is one Lua script (one round trip). Key layout in README.md.
 */
export class DestinationSlots {
  readonly redis: Redis;
  readonly prefix: string;
  readonly leaseMs: number;

  constructor(redis: Redis, opts: DestinationSlotsOptions = {}) {
    this.redis = redis;
    this.prefix = opts.prefix ?? "mailpipe:";
    this.leaseMs = opts.leaseMs ?? 60_000;
    for (const [name, lua] of Object.entries(COMMANDS)) {
      if (!(name in redis)) redis.defineCommand(name, { lua, numberOfKeys: 0 });
    }
  }

  #policyArgs(site: Site, policy: SitePolicy): Arg[] {
    return [
      site.id,
      site.label,
      policy.connections,
      policy.rate?.messages ?? 0,
      policy.rate?.perMs ?? 0,
      policy.priority,
      this.leaseMs,
    ];
  }

  /**
   * First attempts: a slot for the request `token` (its dispatch id), or the recipients (rids of a
   * message whose state is in Redis) wait in the site's wait list as retry jobs. Idempotent: a token
   * that holds a slot keeps it, and recipients that already wait are not added twice.
   */
  async admit(
    site: Site,
    policy: SitePolicy,
    token: string,
    queueId: string,
    rids: readonly string[],
    now = Date.now(),
  ): Promise<AdmitResult> {
    const [id, ...rest] = this.#policyArgs(site, policy);
    return admitResult(await this.redis.mpAdmit(this.prefix, id!, token, ...rest, now, queueId, ...rids));
  }

  /**
   * Retries: as admit(), for jobs the caller claimed; without a slot, the jobs it still holds under
   * their leases move from its lease to the wait list.
   */
  async admitJobs(
    site: Site,
    policy: SitePolicy,
    token: string,
    jobs: readonly { id: string; lease: string }[],
    now = Date.now(),
  ): Promise<AdmitResult> {
    const [id, ...rest] = this.#policyArgs(site, policy);
    return admitResult(
      await this.redis.mpAdmitJobs(
        this.prefix,
        id!,
        token,
        ...rest,
        now,
        ...jobs.flatMap((j) => [j.id, j.lease]),
      ),
    );
  }

  /** Ends slots whose transaction is over; returns how many waiting groups got one. */
  async release(slots: readonly SlotRef[], now = Date.now()): Promise<number> {
    if (slots.length === 0) return 0;
    return this.redis.mpReleaseSlots(this.prefix, now, ...slots.flatMap((s) => [s.site, s.token]));
  }

  /**
   * The admission loop's turn: for up to `maxSites` sites due for a look, gives back slots whose lease
   * ran out with no request recorded and grants free slots to waiters. Returns the expired slots
   * whose request must be looked up, and when the next site is due (ms, or null).
   */
  async grantDue(
    now = Date.now(),
    maxSites = 100,
  ): Promise<{ granted: number; suspects: SuspectSlot[]; nextAt: number | null }> {
    const [granted, next, ...rest] = await this.redis.mpGrantDue(this.prefix, now, maxSites);
    const suspects: SuspectSlot[] = [];
    for (let i = 0; i + 2 < rest.length; i += 3) {
      const req = rest[i + 2]!;
      const sp = req.indexOf(" ");
      suspects.push({
        site: rest[i]!,
        token: rest[i + 1]!,
        seq: Number(req.slice(0, sp)),
        dispatchId: req.slice(sp + 1),
      });
    }
    return { granted: Number(granted), suspects, nextAt: next ? Number(next) : null };
  }

  /**
   * After the lookups: slots whose request is still in MAIL_DELIVER get a new lease (`keep`), the
   * others are given back. Returns how many waiting groups got a slot.
   */
  async settle(results: readonly (SlotRef & { keep: boolean })[], now = Date.now()): Promise<number> {
    if (results.length === 0) return 0;
    return this.redis.mpSettleSlots(
      this.prefix,
      now,
      ...results.flatMap((r) => [r.site, r.token, r.keep ? "1" : "0"]),
    );
  }

  /**
   * The worker's check and renewal: extends the slot to `until` while the token holds it; when its
   * lease ran out and the slot was given back, takes a free one again; "full" when none is free.
   */
  async renew(slot: SlotRef, until: number, now = Date.now()): Promise<"held" | "retaken" | "full"> {
    const r = await this.redis.mpRenewSlot(this.prefix, slot.site, slot.token, Math.round(until), now);
    if (r !== "held" && r !== "retaken" && r !== "full") throw new Error(`unexpected reply ${r}`);
    return r;
  }

  /** Slots in use and recipients waiting, for the `max` sites used most recently (within a day). */
  async stats(max: number, now = Date.now()): Promise<SiteStats[]> {
    const flat = await this.redis.mpSiteStats(this.prefix, now, Math.max(1, max));
    const out: SiteStats[] = [];
    for (let i = 0; i + 4 < flat.length; i += 5) {
      out.push({
        site: flat[i]!,
        label: flat[i + 1]!,
        inUse: Number(flat[i + 2]),
        waiting: Number(flat[i + 3]),
        limit: Number(flat[i + 4]),
      });
    }
    return out;
  }
}

function admitResult([status, granted, waiting]: string[]): AdmitResult {
  if (status === "ok") return { status, granted: Number(granted) };
  if (status === "wait") return { status, granted: Number(granted), waiting: Number(waiting) };
  throw new Error(`unexpected reply ${status}`);
}
