// The router's decisions about one recipient: final states and retries. Every path that changes a
// recipient (routing, worker statuses, the scheduler) goes through here, so events, metrics and the
// DSN rules are the same everywhere.
import type { FinalState, FinishResult, OutcomePatch, RecipientRecord } from "@mailpipe/queue";
import { attr, inSpan } from "@mailpipe/telemetry";
import type { RouterContext } from "./deps.ts";
import { delayNoticeDue, isExpired, nextAttemptAt } from "./retry-policy.ts";

/** The message fields these decisions need. */
export interface OutcomeMessage {
  queueId: string;
  receivedAt: string;
  mailFrom: string;
  source: "mx" | "msa" | "dsn" | "report";
  notices: boolean;
}

function recipientFields(r: RecipientRecord, patch: OutcomePatch) {
  return {
    recipient: r.address,
    reply: patch.lastReply,
    attempt: r.attempt,
    ...(r.kind === "remote" && r.domain ? { destination: r.domain } : {}),
    ...(patch.remoteMta ? { remoteMta: patch.remoteMta.slice(0, 300) } : {}),
  };
}

/** Records that a message is done (every recipient final, no DSN pending). */
export function observeFinal(ctx: RouterContext, queueId: string, receivedAt: string): void {
  const seconds = Math.max(0, (ctx.now() - Date.parse(receivedAt)) / 1000);
  ctx.metrics.finalSeconds.observe(seconds);
  ctx.telemetry.log.info({ queueId, seconds }, "message final: body deletion queued");
}

/**
 * Makes `r` final, if it is still pending on the attempt the caller saw. Failures (bounced,
 * expired) queue a DSN with `dsn: true`; the queue leaves it out when the message allows none.
 */
export async function finishRecipient(
  ctx: RouterContext,
  msg: OutcomeMessage,
  r: RecipientRecord,
  state: FinalState,
  patch: OutcomePatch,
  opts: { dsn: boolean },
): Promise<FinishResult> {
  const { log } = ctx.telemetry;
  const res = await ctx.queue.finishRecipient(msg.queueId, r.rid, r.attempt, state, patch, {
    dsn: opts.dsn,
    now: ctx.now(),
  });
  if (res.status !== "ok") {
    log.debug({ recipient: r.address, attempt: r.attempt, result: res.status }, "outcome ignored: stale");
    return res;
  }
  ctx.metrics.final.inc({ state });
  if (state !== "delivered") {
    ctx.bus.emit({ type: state, queueId: msg.queueId, ...recipientFields(r, patch) });
    log.info(
      { recipient: r.address, state, reply: patch.lastReply, attempt: r.attempt },
      state === "expired" ? "recipient expired" : "recipient bounced",
    );
    if (opts.dsn && !res.dsnQueued) {
      const why = !msg.notices
        ? msg.source === "dsn"
          ? "the failed message is itself a DSN"
          : "the message has a null envelope sender"
        : "the recipient asked for no failure notice (NOTIFY)";
      log.info({ recipient: r.address, why }, "no DSN sent");
      ctx.metrics.dsn.inc({ kind: "suppressed" });
      ctx.bus.emit({
        type: "dsn",
        queueId: msg.queueId,
        recipient: r.address,
        reply: patch.lastReply,
        detail: `not sent: ${why}`,
      });
    }
  }
  if (res.finalized) observeFinal(ctx, msg.queueId, res.finalized);
  return res;
}

/**
 * A temporary failure of attempt `r.attempt`: past the queue lifetime the recipient expires (a
 * failure DSN); otherwise its next attempt is scheduled per RETRY_SCHEDULE with jitter, and the
 * message's one delay notice is queued once it has waited DELAY_WARNING.
 */
export async function deferRecipient(
  ctx: RouterContext,
  msg: OutcomeMessage,
  r: RecipientRecord,
  patch: OutcomePatch,
): Promise<"scheduled" | "expired" | "stale"> {
  const now = ctx.now();
  if (isExpired(ctx.policy, msg.receivedAt, now)) {
    const res = await finishRecipient(ctx, msg, r, "expired", patch, { dsn: true });
    return res.status === "ok" ? "expired" : "stale";
  }
  const dueAt = nextAttemptAt(ctx.policy, r.attempt, msg.receivedAt, now);
  const delayNotice = r.notifyDelay && delayNoticeDue(ctx.policy, msg.receivedAt, now);
  const res = await inSpan(
    ctx.telemetry.tracer,
    "schedule",
    {
      attributes: {
        [attr.queueId]: msg.queueId,
        [attr.attempt]: r.attempt + 1,
        [attr.recipientDomain]: r.domain,
        [attr.replyCode]: patch.lastReply.code,
        [attr.replyEnhanced]: patch.lastReply.enhanced,
      },
    },
    () => ctx.queue.scheduleRetry(msg.queueId, r.rid, r.attempt, dueAt, patch, { delayNotice, now }),
  );
  if (res.status !== "ok") {
    ctx.telemetry.log.debug({ recipient: r.address, attempt: r.attempt }, "deferral ignored: stale");
    return "stale";
  }
  ctx.metrics.scheduled.inc();
  ctx.bus.emit({
    type: "deferred",
    queueId: msg.queueId,
    ...recipientFields(r, patch),
    detail: `attempt ${r.attempt + 1} at ${new Date(dueAt).toISOString()}`,
  });
  ctx.telemetry.log.info(
    { recipient: r.address, attempt: r.attempt, reply: patch.lastReply, nextAttemptAt: new Date(dueAt) },
    "recipient deferred: retry scheduled",
  );
  return "scheduled";
}
