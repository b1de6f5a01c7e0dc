// The watchdog's question before it dispatches a silent recipient again: is its request still waiting
// in MAIL_DELIVER? That stream is a work queue: a request stays in it until a worker acks (or
// terminates) it, so one that is still there is queued or being worked on, not lost, however long it
// has been silent (a backlog, workers down, a saturated destination, a slow transaction). Dispatching
// it again would put a second copy in line and the recipient could get the message twice.
import { replies, topology } from "@mailpipe/contracts";
import type { RetryJob, StaleCandidate } from "@mailpipe/queue";
import { mapLimit } from "@mailpipe/service-kit";
import type { RouterContext } from "./deps.ts";

/** Stream lookups at once within one round. */
const LOOKUP_CONCURRENCY = 16;

type Where = "queued" | "gone" | "unknown";

/** Whether the request stored at `seq` is still in MAIL_DELIVER (and is this message's). */
async function requestState(ctx: RouterContext, c: StaleCandidate): Promise<Where> {
  // no sequence recorded (routed by an older router, or its record failed): as before, take it
  if (c.seq === undefined) return "gone";
  try {
    const stored = await ctx.bus.jsm.streams.getMessage(topology.streams.deliver.name, { seq: c.seq });
    // a recreated stream starts numbering again: the sequence must still hold this message's request
    return stored?.header?.get("Nats-Msg-Id").startsWith(`${c.queueId}:`) ? "queued" : "gone";
  } catch (err) {
    ctx.telemetry.log.debug({ err: (err as Error).message, seq: c.seq }, "MAIL_DELIVER lookup failed");
    return "unknown";
  }
}

/** What the scheduler asks the watchdog each round. */
export interface Watchdog {
  /**
   * Claims (as claimStale does) the recipients silent for STALE_DISPATCH whose request is no longer
   * in MAIL_DELIVER: acked without a status, terminated, or lost. Those whose request is still there
   * wait another STALE_DISPATCH; those that could not be looked up are asked about again next round.
   * Safe with several replicas: claimStale re-checks each recipient's silence atomically, so one
   * another replica found still queued (and touched) is not taken.
   */
  claimSilent(now: number): Promise<RetryJob[]>;
}

export function createWatchdog(ctx: RouterContext): Watchdog {
  const { SCHEDULER_BATCH, SCHEDULER_LEASE, STALE_DISPATCH } = ctx.config;
  const { log } = ctx.telemetry;
  // with NATS away every round would say so: once a minute is enough
  let warnedAt = 0;

  return {
    async claimSilent(now) {
      const before = now - STALE_DISPATCH;
      const candidates = await ctx.queue.staleCandidates(before, SCHEDULER_BATCH);
      if (candidates.length === 0) return [];
      const states = await mapLimit(candidates, LOOKUP_CONCURRENCY, (c) => requestState(ctx, c));
      const queued = candidates.filter((_, i) => states[i] === "queued");
      const gone = candidates.filter((_, i) => states[i] === "gone");
      const unknown = states.filter((s) => s === "unknown").length;
      if (queued.length > 0) {
        await ctx.queue.touchDispatched(
          queued.map((c) => c.id),
          now,
        );
        ctx.metrics.staleQueued.inc(queued.length);
        log.info(
          { recipients: queued.length, oldestDispatchedAt: new Date(queued[0]!.dispatchedAt).toISOString() },
          "silent recipients still queued on MAIL_DELIVER: waiting for their workers, not dispatching again",
        );
      }
      if (unknown > 0 && Date.now() - warnedAt > 60_000) {
        warnedAt = Date.now();
        log.warn({ recipients: unknown }, "could not look up silent recipients' requests; trying next round");
      }
      return ctx.queue.claimStale(
        now,
        before,
        gone.length,
        SCHEDULER_LEASE,
        replies.noDeliveryResult(),
        gone.map((c) => c.id),
      );
    },
  };
}
