// Admission to destinations: the router is the queue manager, so it takes a destination slot (and a
// rate token) in Redis before it publishes a remote request, as Postfix's qmgr owns per-destination
// concurrency. A request with no slot is not published: its recipients wait in the site's wait list
// (Redis), holding no worker, and are granted a slot when one frees: by the status that ends a
// transaction (its script hands the slot on), or by this module's loop when the rate's next time
// comes or a lease runs out. Granted recipients are due in the schedule at once and leave through
// the scheduler's retry path, with the slot they were granted.
import type { RequestSlot, SlotRef } from "@mailpipe/contracts";
import { type MxHost, topology } from "@mailpipe/contracts";
import {
  type AdmitResult,
  DestinationSlots,
  type RecipientRecord,
  type RetryJob,
  type Site,
  type SitePolicy,
  type SuspectSlot,
  siteOf,
} from "@mailpipe/queue";
import { mapLimit } from "@mailpipe/service-kit";
import { boundedLabel, OTHER_LABEL } from "@mailpipe/telemetry";
import type { Redis } from "ioredis";
import type { Config } from "./config.ts";
import type { RouterContext } from "./deps.ts";
import { policyFor } from "./destination-limits.ts";

/** A destination as admission sees it: its site and the limits in force. */
export interface Destination {
  domain: string;
  site: Site;
  policy: SitePolicy;
}

export interface Admission {
  readonly slots: DestinationSlots;
  /** the site of a destination (its MX hosts) and its limits */
  destination(domain: string, hosts: readonly MxHost[]): Destination;
  /** first attempts: the slot to publish with, or null when the recipients now wait for one */
  admitFirst(
    dest: Destination,
    dispatchId: string,
    queueId: string,
    recipients: readonly RecipientRecord[],
  ): Promise<RequestSlot | null>;
  /**
   * retries the scheduler holds: the slot to publish with (the one a job was granted, when it still
   * holds), or null when the jobs moved to the wait list
   */
  admitJobs(dest: Destination, dispatchId: string, jobs: readonly RetryJob[]): Promise<RequestSlot | null>;
  /** ends slots whose transaction is over (non-delivered statuses, unused grants) */
  release(slots: readonly SlotRef[]): Promise<void>;
  /** waiting groups got a slot (and are due in the schedule): run the scheduler soon */
  granted(n: number | undefined): void;
  /** starts the loop; `kick` runs a scheduler round */
  start(kick: () => void): void;
  stop(): Promise<void>;
}

/** Expired slots looked up in MAIL_DELIVER at once. */
const LOOKUP_CONCURRENCY = 16;
/** Sites the loop looks at per turn. */
const SITES_PER_TURN = 200;

type Where = "queued" | "gone" | "unknown";

export function createAdmission(ctx: Omit<RouterContext, "admission">, redis: Redis): Admission {
  const config: Config = ctx.config;
  const { log } = ctx.telemetry;
  const metrics = ctx.telemetry.metrics;
  const leaseMs = config.DESTINATION_SLOT_LEASE;
  const slots = new DestinationSlots(redis, { prefix: ctx.queue.prefix, leaseMs });
  const defaults = { connections: config.DESTINATION_CONNECTIONS, rate: config.DESTINATION_RATE };

  const admissions = metrics.counter(
    "destination_admissions_total",
    "Remote requests admitted to their destination site (slot) or left waiting for one (wait)",
    ["result"],
  );
  const reclaimed = metrics.counter(
    "destination_slots_reclaimed_total",
    "Destination slots given back after their lease ran out with their request gone from MAIL_DELIVER",
  );
  const label = boundedLabel(config.METRICS_MAX_DESTINATIONS);
  let stats: Promise<Map<string, { inUse: number; waiting: number }>> | undefined;
  // both gauges are collected in one scrape: one Redis round trip for the two
  const currentStats = () => {
    stats ??= slots
      .stats(Math.max(config.METRICS_MAX_DESTINATIONS, 1) * 2, ctx.now())
      .then((rows) => {
        const out = new Map<string, { inUse: number; waiting: number }>();
        for (const r of rows) {
          const l = config.METRICS_MAX_DESTINATIONS === 0 ? OTHER_LABEL : label(r.label);
          const v = out.get(l) ?? { inUse: 0, waiting: 0 };
          v.inUse += r.inUse;
          v.waiting += r.waiting;
          out.set(l, v);
        }
        return out;
      })
      .finally(() => {
        setTimeout(() => {
          stats = undefined;
        }, 100).unref();
      });
    return stats;
  };
  const gauge = (name: string, help: string, pick: (v: { inUse: number; waiting: number }) => number) =>
    metrics.gauge(name, help, ["site"], async function () {
      try {
        const rows = await currentStats();
        this.reset();
        for (const [site, v] of rows) this.set({ site }, pick(v));
      } catch (err) {
        log.warn({ err: (err as Error).message }, "could not read destination slots for metrics");
      }
    });
  gauge(
    "destination_slots_in_use",
    `Destination slots held (SMTP transactions in flight or on their way to a worker), by site (MX hosts; past METRICS_MAX_DESTINATIONS sites: "${OTHER_LABEL}")`,
    (v) => v.inUse,
  );
  gauge(
    "destination_waiting_recipients",
    "Recipients waiting in the router's schedule for a destination slot, by site",
    (v) => v.waiting,
  );

  let kick: () => void = () => {};
  const granted = (n: number | undefined) => {
    if (n && n > 0) kick();
  };
  const slotFor = (dest: Destination, token: string): RequestSlot => ({
    site: dest.site.id,
    token,
    until: ctx.now() + leaseMs,
    leaseMs,
  });
  const outcome = (dest: Destination, token: string, res: AdmitResult): RequestSlot | null => {
    granted(res.granted);
    admissions.inc({ result: res.status === "ok" ? "slot" : "wait" });
    if (res.status === "ok") return slotFor(dest, token);
    // at a busy destination this is every message: counted in destination_admissions_total
    if (res.waiting > 0) {
      log.debug(
        {
          destination: dest.domain,
          site: dest.site.label,
          recipients: res.waiting,
          limit: dest.policy.connections,
        },
        "destination site at its limit: recipients wait for a slot",
      );
    }
    return null;
  };

  /** Whether the request a slot went out with is still in MAIL_DELIVER (queued or with a worker). */
  const lookup = async (s: SuspectSlot): Promise<Where> => {
    try {
      const stored = await ctx.bus.jsm.streams.getMessage(topology.streams.deliver.name, { seq: s.seq });
      return stored?.header?.get("Nats-Msg-Id") === s.dispatchId ? "queued" : "gone";
    } catch (err) {
      log.debug({ err: (err as Error).message, seq: s.seq }, "MAIL_DELIVER lookup failed");
      return "unknown";
    }
  };

  let timer: NodeJS.Timeout | undefined;
  let running: Promise<void> | undefined;
  let stopped = true;
  let failing = false;

  const turn = async (): Promise<number | null> => {
    const now = ctx.now();
    const due = await slots.grantDue(now, SITES_PER_TURN);
    let n = due.granted;
    if (due.suspects.length > 0) {
      const where = await mapLimit(due.suspects, LOOKUP_CONCURRENCY, lookup);
      const decided = due.suspects
        .map((s, i) => ({
          site: s.site,
          token: s.token,
          keep: where[i] === "queued",
          known: where[i] !== "unknown",
        }))
        .filter((d) => d.known);
      n += await slots.settle(decided, now);
      const gone = decided.filter((d) => !d.keep).length;
      if (gone > 0) {
        reclaimed.inc(gone);
        log.warn(
          { slots: gone },
          "destination slots whose lease ran out and whose request is gone from MAIL_DELIVER: given back",
        );
      }
    }
    granted(n);
    return due.nextAt;
  };

  const schedule = (delayMs: number) => {
    if (stopped) return;
    timer = setTimeout(() => {
      running = turn()
        .then((nextAt) => {
          if (failing) log.info("destination admission loop recovered");
          failing = false;
          const wait = nextAt === null ? config.SCHEDULER_INTERVAL : nextAt - ctx.now();
          return Math.min(config.SCHEDULER_INTERVAL, Math.max(5, wait));
        })
        .catch((err) => {
          if (!failing)
            log.error({ err: (err as Error).message }, "destination admission loop failed; will retry");
          failing = true;
          return config.SCHEDULER_INTERVAL;
        })
        .then((next) => {
          running = undefined;
          schedule(next);
        });
    }, delayMs);
  };

  return {
    slots,
    destination(domain, hosts) {
      const exchanges = hosts.map((h) => h.exchange);
      return {
        domain,
        site: siteOf(exchanges),
        policy: policyFor(config.DESTINATION_LIMITS, defaults, domain, exchanges),
      };
    },
    async admitFirst(dest, dispatchId, queueId, recipients) {
      const res = await slots.admit(
        dest.site,
        dest.policy,
        dispatchId,
        queueId,
        recipients.map((r) => r.rid),
        ctx.now(),
      );
      return outcome(dest, dispatchId, res);
    },
    async admitJobs(dest, dispatchId, jobs) {
      // a group granted a slot goes out under the slot's token, as long as it holds
      const token = jobs.find((j) => j.slot?.site === dest.site.id)?.slot?.token ?? dispatchId;
      const res = await slots.admitJobs(dest.site, dest.policy, token, jobs, ctx.now());
      return outcome(dest, token, res);
    },
    async release(list) {
      granted(await slots.release(list, ctx.now()));
    },
    granted,
    start(k) {
      kick = k;
      stopped = false;
      schedule(config.SCHEDULER_INTERVAL);
    },
    async stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      await running;
    },
  };
}
