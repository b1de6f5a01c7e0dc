// The scheduler loop: every SCHEDULER_INTERVAL, take due jobs from Redis (atomically, so several
// router replicas share them) and act on them: re-dispatch retries, expire, send DSNs, delete bodies.
// Its watchdog takes recipients no worker reported on within STALE_DISPATCH whose request has left
// MAIL_DELIVER (a lost request or status, a request a worker dropped; see watchdog.ts) and sends them
// through the same retry path as the next attempt.
import { destinationToken, isSpoolRef, replies } from "@mailpipe/contracts";
import type { ClaimedJob, MessageRecord, RetryJob, SlotRef } from "@mailpipe/queue";
import { mapLimit } from "@mailpipe/service-kit";
import { attr, contextWithQueueId, inSpan } from "@mailpipe/telemetry";
import { context } from "@opentelemetry/api";
import type { RouterContext } from "./deps.ts";
import {
  lookupMailHosts,
  type Published,
  publishedSlots,
  publishLocal,
  publishRemote,
  toMxHosts,
} from "./dispatch.ts";
import { runDsnTask } from "./dsn-task.ts";
import { deferRecipient, finishRecipient } from "./outcomes.ts";
import { isExpired } from "./retry-policy.ts";
import { contextFromTraceparent } from "./trace.ts";
import { createWatchdog } from "./watchdog.ts";

/** Groups (message × destination) handled at once within one round. */
const GROUP_CONCURRENCY = 16;

export interface Scheduler {
  /** runs one round now (tests; the loop calls it on its own) */
  tick(): Promise<void>;
  /** runs a round soon: now, or right after the one in progress (jobs became due: slots granted) */
  kick(): void;
  /** stops the loop after the round in progress */
  stop(): Promise<void>;
}

function inMessageContext<T>(queueId: string, traceparent: string | undefined, fn: () => Promise<T>) {
  return context.with(contextWithQueueId(contextFromTraceparent(traceparent), queueId), fn);
}

export function startScheduler(ctx: RouterContext): Scheduler {
  const { log } = ctx.telemetry;
  const { SCHEDULER_INTERVAL, SCHEDULER_BATCH, SCHEDULER_LEASE } = ctx.config;
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<void> | undefined;
  let failing = false;
  let again = false;
  const watchdog = createWatchdog(ctx);

  const round = async (): Promise<void> => {
    const now = ctx.now();
    const released = await ctx.queue.releaseExpiredLeases(now);
    if (released > 0) log.warn({ released }, "jobs whose lease expired are due again");
    const jobs = await ctx.queue.claim(now, SCHEDULER_BATCH, SCHEDULER_LEASE);
    const silent = await watchdog.claimSilent(now);
    if (jobs.length === 0 && silent.length === 0) return;
    const renewal = keepLeases(ctx, [...jobs, ...silent]);
    try {
      const tasks = jobs.filter((j) => j.kind !== "retry");
      const retries = jobs.filter((j): j is RetryJob => j.kind === "retry");
      await mapLimit(tasks, GROUP_CONCURRENCY, (job) => runTask(ctx, job));
      await runRetries(ctx, [...retries, ...silent]);
    } finally {
      renewal.stop();
    }
  };

  const tick = async (): Promise<void> => {
    if (running) return running;
    running = (async () => {
      try {
        await round();
        if (failing) log.info("scheduler recovered");
        failing = false;
      } catch (err) {
        // Redis or NATS away: claimed jobs come back when their lease runs out
        if (!failing) log.error({ err: (err as Error).message }, "scheduler round failed; will retry");
        failing = true;
      } finally {
        running = undefined;
      }
      if (again && !stopped) {
        again = false;
        void tick();
      }
    })();
    return running;
  };

  const loop = () => {
    if (stopped) return;
    timer = setTimeout(async () => {
      await tick();
      loop();
    }, SCHEDULER_INTERVAL);
  };
  loop();

  return {
    tick,
    kick() {
      if (stopped) return;
      if (running) again = true;
      else void tick();
    },
    async stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      await running;
    },
  };
}

/**
 * A round can outlast SCHEDULER_LEASE (slow DNS for many groups, a slow Redis or NATS). Once a lease
 * runs out another replica returns the job to the schedule and claims it, and both would publish the
 * retry: JetStream only drops the second copy inside its duplicate window. So the round keeps its
 * leases alive while it works (renewed every third of the lease, only while the token is still
 * ours), and redispatch() renews a group's leases once more right before publishing and leaves out
 * jobs it no longer holds. Renewing, rather than skipping jobs whose lease is nearly over, means a
 * slow round neither throws away its DNS work nor hands it to a replica that would be just as slow.
 */
function keepLeases(ctx: RouterContext, jobs: readonly ClaimedJob[]): { stop(): void } {
  const lease = ctx.config.SCHEDULER_LEASE;
  const timer = setInterval(
    () => {
      ctx.queue.renewLeases(jobs, ctx.now() + lease).catch((err) => {
        // the check before each publish still keeps a job that was lost from going out twice
        ctx.telemetry.log.warn({ err: (err as Error).message }, "could not renew scheduler leases");
      });
    },
    Math.max(10, Math.floor(lease / 3)),
  );
  timer.unref();
  return { stop: () => clearInterval(timer) };
}

/** The jobs of `jobs` this replica still holds, their leases renewed; logs the ones it lost. */
async function stillHeld(ctx: RouterContext, jobs: RetryJob[]): Promise<RetryJob[]> {
  const held = await ctx.queue.renewLeases(jobs, ctx.now() + ctx.config.SCHEDULER_LEASE);
  const kept = jobs.filter((j) => held.has(j.id));
  if (kept.length < jobs.length) {
    ctx.telemetry.log.warn(
      { lost: jobs.length - kept.length },
      "scheduler lease ran out before the retry was published; another replica handles it",
    );
  }
  return kept;
}

async function runTask(ctx: RouterContext, job: ClaimedJob): Promise<void> {
  try {
    if (job.kind === "gc") {
      if (job.spool) await ctx.bodies.deleteSpooled(job.spool.stream, job.spool.seq);
      if (!isSpoolRef(job.body)) await ctx.bodies.delete(job.body.key);
      await ctx.queue.complete([job]);
      ctx.telemetry.log.debug({ queueId: job.queueId }, "body deleted");
    } else if (job.kind === "dsn") {
      await inMessageContext(job.queueId, undefined, () => runDsnTask(ctx, job));
    }
  } catch (err) {
    ctx.telemetry.log.error(
      { err: (err as Error).message, job: job.id },
      "task failed; it runs again when its lease expires",
    );
  }
}

/** Retries of one round: grouped per message, then per destination, each group in its message's trace. */
async function runRetries(ctx: RouterContext, jobs: RetryJob[]): Promise<void> {
  const byMessage = new Map<string, RetryJob[]>();
  for (const j of jobs) byMessage.set(j.queueId, [...(byMessage.get(j.queueId) ?? []), j]);
  const groups: { msg: MessageRecord; dest: string; jobs: RetryJob[] }[] = [];
  // jobs that end here do not use the destination slot they were granted
  const ended: RetryJob[] = [];
  for (const [queueId, list] of byMessage) {
    const msg = await ctx.queue.getMessageRecord(queueId);
    if (!msg) {
      // the message finished (or its state is gone): nothing left to retry
      await ctx.queue.complete(list);
      ended.push(...list);
      continue;
    }
    const rest: RetryJob[] = [];
    for (const job of list) {
      const expired = isExpired(ctx.policy, msg.receivedAt, ctx.now());
      if (job.stale && !job.mark) {
        await inMessageContext(queueId, msg.traceparent, async () => reportSilence(ctx, job, expired));
      }
      if (job.mark || expired) {
        await inMessageContext(queueId, msg.traceparent, () => endJob(ctx, msg, job));
        ended.push(job);
      } else rest.push(job);
    }
    const byDest = new Map<string, RetryJob[]>();
    for (const job of rest) {
      const r = job.recipient;
      const dest = r.kind === "local" ? "local" : (r.domain ?? "");
      byDest.set(dest, [...(byDest.get(dest) ?? []), job]);
    }
    for (const [dest, g] of byDest) groups.push({ msg, dest, jobs: g });
  }
  await releaseGrants(ctx, ended, new Set());
  await mapLimit(groups, GROUP_CONCURRENCY, (g) =>
    inMessageContext(g.msg.queueId, g.msg.traceparent, () =>
      redispatch(ctx, g.msg, g.dest, g.jobs).catch((err) => {
        ctx.telemetry.log.error(
          { err: (err as Error).message, destination: g.dest },
          "re-dispatch failed; the jobs run again when their lease expires",
        );
      }),
    ),
  );
}

/**
 * The watchdog found a recipient no worker reported on: says so (warning and a `deferred` event
 * when it is dispatched again; expiry has its own event). A job whose lease ran out says it again
 * when it is claimed again.
 */
function reportSilence(ctx: RouterContext, job: RetryJob, expiring: boolean): void {
  const r = job.recipient;
  const since = job.stale!.dispatchedAt;
  const waitedSeconds = Math.round((ctx.now() - Date.parse(since)) / 1000);
  ctx.telemetry.log.warn(
    {
      recipient: r.address,
      kind: r.kind,
      attempt: r.attempt - 1,
      dispatchedAt: since,
      waitedSeconds,
    },
    expiring
      ? "no delivery result reported and the queue lifetime is over: recipient expires"
      : "no delivery result reported: dispatching the recipient again",
  );
  if (expiring) return;
  ctx.bus.emit({
    type: "deferred",
    queueId: job.queueId,
    recipient: r.address,
    reply: replies.noDeliveryResult(true),
    attempt: r.attempt - 1,
    ...(r.kind === "remote" && r.domain ? { destination: r.domain } : {}),
    detail: `no result for attempt ${r.attempt - 1} after ${waitedSeconds} s: attempt ${r.attempt} now`,
  });
}

/** Operator marks and expiry: the recipient ends here instead of being tried again. */
async function endJob(ctx: RouterContext, msg: MessageRecord, job: RetryJob): Promise<void> {
  const r = job.recipient;
  const at = new Date(ctx.now()).toISOString();
  if (job.mark) {
    const patch = { lastReply: replies.deletedByOperator(), lastAttemptAt: at };
    await finishRecipient(ctx, msg, r, "bounced", patch, { dsn: job.mark === "bounce" });
    ctx.telemetry.log.info({ recipient: r.address, action: job.mark }, "recipient removed by the operator");
  } else {
    const patch = {
      lastReply: r.lastReply ?? replies.expired(),
      // a silent attempt was last tried when it was dispatched, and no remote MTA answered it
      lastAttemptAt: job.stale?.dispatchedAt ?? r.lastAttemptAt ?? at,
      ...(r.remoteMta && !job.stale ? { remoteMta: r.remoteMta } : {}),
    };
    const res = await finishRecipient(ctx, msg, r, "expired", patch, { dsn: true });
    if (res.status === "ok" && job.stale) ctx.metrics.staleExpired.inc();
  }
  await ctx.queue.complete([job]);
}

/**
 * Gives back the destination slots granted to `jobs` that no request went out with (`used`: the
 * tokens that did): the job ended, its group went under another grant's slot, or its MX hosts changed.
 */
async function releaseGrants(ctx: RouterContext, jobs: readonly RetryJob[], used: ReadonlySet<string>) {
  const unused = new Map<string, SlotRef>();
  for (const j of jobs)
    if (j.slot && !used.has(j.slot.token)) unused.set(`${j.slot.site}:${j.slot.token}`, j.slot);
  if (unused.size === 0) return;
  await ctx.admission.release([...unused.values()]).catch((err) => {
    ctx.telemetry.log.warn(
      { err: (err as Error).message },
      "could not give back unused destination slots; their lease returns them",
    );
  });
}

/** Publishes one destination's retries, or re-schedules / bounces them when DNS says so. */
async function redispatch(ctx: RouterContext, msg: MessageRecord, dest: string, claimed: RetryJob[]) {
  const attempt = Math.max(...claimed.map((j) => j.recipient.attempt));
  await inSpan(
    ctx.telemetry.tracer,
    "retry",
    {
      attributes: {
        [attr.queueId]: msg.queueId,
        [attr.destination]: dest === "local" ? "local" : destinationToken(dest),
        [attr.attempt]: attempt,
        [attr.recipientCount]: claimed.length,
      },
    },
    async () => {
      const dispatched = async (kind: "local" | "remote", jobs: RetryJob[], published: Published[]) => {
        const seqs = new Map<string, number>();
        for (const p of published) for (const rid of p.rids) seqs.set(`${msg.queueId}:${rid}`, p.seq);
        await ctx.queue.completeDispatched(jobs, ctx.now(), seqs, publishedSlots(published));
        ctx.metrics.dispatched.inc({ kind }, jobs.length);
        const silent = jobs.filter((j) => j.stale).length;
        if (silent > 0) ctx.metrics.staleRedispatched.inc({ kind }, silent);
      };
      if (dest === "local") {
        const jobs = await stillHeld(ctx, claimed);
        if (jobs.length === 0) return;
        const published = await publishLocal(
          ctx,
          msg,
          jobs.map((j) => j.recipient),
          { retry: true },
        );
        await dispatched("local", jobs, published);
        return;
      }
      const hosts = await lookupMailHosts(ctx, dest);
      const at = new Date(ctx.now()).toISOString();
      const recipients = claimed.map((j) => j.recipient);
      if (hosts.kind === "hosts") {
        // the lookup may have taken longer than the lease
        const jobs = await stillHeld(ctx, claimed);
        if (jobs.length === 0) return;
        const mxHosts = toMxHosts(hosts);
        const target = ctx.admission.destination(dest, mxHosts);
        const byRid = new Map(jobs.map((j) => [j.recipient.rid, j]));
        // a group with no slot is not published: its jobs moved to the site's wait list
        const published = await publishRemote(
          ctx,
          msg,
          dest,
          mxHosts,
          jobs.map((j) => j.recipient),
          {
            retry: true,
            admit: (id, part) =>
              ctx.admission.admitJobs(
                target,
                id,
                part.map((r) => byRid.get(r.rid)!),
              ),
          },
        );
        const sent = new Set(published.flatMap((p) => p.rids));
        await dispatched(
          "remote",
          jobs.filter((j) => sent.has(j.recipient.rid)),
          published,
        );
        await releaseGrants(ctx, jobs, new Set(published.flatMap((p) => (p.slot ? [p.slot.token] : []))));
        return;
      }
      if (hosts.kind === "temp") {
        const patch = { lastReply: replies.dnsTempFail(dest), lastAttemptAt: at };
        for (const r of recipients) await deferRecipient(ctx, msg, r, patch);
      } else {
        const reply = hosts.kind === "nullmx" ? replies.nullMx(dest) : replies.domainNotFound(dest);
        for (const r of recipients) {
          await finishRecipient(
            ctx,
            msg,
            r,
            "bounced",
            { lastReply: reply, lastAttemptAt: at },
            { dsn: true },
          );
        }
      }
      // the new schedule or final state replaced these jobs; this only clears any left behind
      await ctx.queue.complete(claimed);
      await releaseGrants(ctx, claimed, new Set());
    },
  );
}
