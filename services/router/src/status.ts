// mail.v1.status.* → recipient state: the workers report, the router decides what happens next.
import type { RecipientStatus } from "@mailpipe/contracts";
import type { OutcomePatch } from "@mailpipe/queue";
import type { RouterContext } from "./deps.ts";
import { deferRecipient, finishRecipient, observeFinal } from "./outcomes.ts";

/**
 * Applies one worker status. A status for another attempt than the one the recipient is on (an
 * older attempt, or a duplicate after the recipient moved on) and statuses for finished messages
 * are acknowledged and ignored. The Redis write happens before the handler returns (and the bus acks).
 */
export function createStatusHandler(ctx: RouterContext) {
  const { log } = ctx.telemetry;
  return async (s: RecipientStatus): Promise<void> => {
    const kind = s.service === "mda" ? "local" : "remote";
    if (s.outcome === "delivered") {
      // the common case needs nothing but the recipient's own state: one round trip
      const patch: OutcomePatch = {
        lastReply: s.reply,
        lastAttemptAt: s.at,
        ...(s.remoteMta ? { remoteMta: s.remoteMta } : {}),
      };
      const res = await ctx.queue.finishByAddress(
        s.queueId,
        s.recipient,
        kind,
        s.attempt,
        "delivered",
        patch,
        {
          // a success notice when the recipient asked for one (NOTIFY=SUCCESS): "delivered" for a
          // mailbox, "relayed" for a next hop without DSN; one with DSN got the request passed on
          dsn: s.dsnRelayed !== true,
          now: ctx.now(),
          // the transaction is over: its destination slot goes to the next in line, in this script
          slot: s.slot,
        },
      );
      ctx.admission.granted(res.granted);
      if (res.status === "missing") {
        log.info(
          { recipient: s.recipient, outcome: s.outcome },
          "status for an unknown or finished message: ignored",
        );
      } else if (res.status === "stale") {
        log.debug(
          {
            recipient: s.recipient,
            attempt: s.attempt,
            current: res.recipient.attempt,
            state: res.recipient.state,
          },
          "stale or duplicate status: ignored",
        );
      } else {
        ctx.metrics.final.inc({ state: "delivered" });
        if (res.finalized) observeFinal(ctx, s.queueId, res.finalized);
      }
      return;
    }
    // the transaction is over whatever its outcome (a redelivered status releases nothing twice)
    if (s.slot) await ctx.admission.release([s.slot]);
    const r = await ctx.queue.findRecipient(s.queueId, s.recipient, kind);
    if (!r) {
      log.info(
        { recipient: s.recipient, outcome: s.outcome },
        "status for an unknown or finished message: ignored",
      );
      return;
    }
    if (r.state !== "pending" || r.attempt !== s.attempt) {
      log.debug(
        { recipient: s.recipient, attempt: s.attempt, current: r.attempt, state: r.state },
        "stale or duplicate status: ignored",
      );
      return;
    }
    const msg = await ctx.queue.getMessageRecord(s.queueId);
    if (!msg) return;
    const patch: OutcomePatch = {
      lastReply: s.reply,
      lastAttemptAt: s.at,
      ...(s.remoteMta ? { remoteMta: s.remoteMta } : {}),
    };
    if (s.outcome === "bounced") {
      await finishRecipient(ctx, msg, r, "bounced", patch, { dsn: true });
    } else {
      await deferRecipient(ctx, msg, r, patch);
    }
  };
}
