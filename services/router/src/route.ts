// mail.v1.spool → delivery requests: the first attempt of every recipient of a message.
import type { HandlerContext } from "@mailpipe/bus";
import { type BodyRef, type QueuedMail, replies, topology } from "@mailpipe/contracts";
import type { MessageInput, RecipientRecord } from "@mailpipe/queue";
import { mapLimit } from "@mailpipe/service-kit";
import { attr, inSpan, SpanKind } from "@mailpipe/telemetry";
import type { RouterContext } from "./deps.ts";
import {
  type DispatchMessage,
  dispatchSeqs,
  lookupMailHosts,
  publishedSlots,
  publishLocal,
  publishRemote,
  toMxHosts,
} from "./dispatch.ts";
import { expandRecipients } from "./expand.ts";
import { deferRecipient, finishRecipient, type OutcomeMessage, observeFinal } from "./outcomes.ts";
import { currentTraceparent } from "./trace.ts";

/** Destinations of one message resolved at once. */
const DOMAIN_CONCURRENCY = 16;

function groupBy<T>(items: readonly T[], key: (item: T) => string): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const item of items) {
    const k = key(item);
    const list = out.get(k);
    if (list) list.push(item);
    else out.set(k, [item]);
  }
  return out;
}

/**
 * Routes one queued message. The recipients' state is written to Redis before anything is
 * published, and the handler returns (the bus acks) only after every publish was acked. A
 * redelivered message finds its state in Redis: only recipients still waiting for their first
 * attempt are published again, with the same dispatch ids, which JetStream stores once.
 */
export function createRouteHandler(ctx: RouterContext) {
  const { log, tracer } = ctx.telemetry;

  return async (mail: QueuedMail, hctx: HandlerContext): Promise<void> => {
    await inSpan(
      tracer,
      "route",
      {
        kind: SpanKind.INTERNAL,
        attributes: {
          [attr.queueId]: mail.queueId,
          [attr.source]: mail.source,
          [attr.recipientCount]: mail.envelope.rcptTo.length,
          [attr.size]: mail.body.size,
        },
      },
      async () => {
        const now = ctx.now();
        const notices = mail.envelope.mailFrom !== "" && mail.source !== "dsn";
        const planned = expandRecipients(ctx.directory(), mail.envelope.rcptTo, {
          plusSeparator: ctx.config.PLUS_SEPARATOR,
          now,
        });
        const traceparent = currentTraceparent();
        // a spool message stays until the message is final (deleted then); one from the pre-spool
        // work queue is gone once acked, and its body is in the Object Store
        const spooled = hctx.stream === topology.streams.queued.name;
        let body: BodyRef;
        if ("attached" in mail.body) {
          if (!spooled || !hctx.attachment) {
            throw new Error(`message ${mail.queueId} says its body is attached, but it carries none`);
          }
          body = { stream: hctx.stream, seq: hctx.seq, size: mail.body.size, sha256: mail.body.sha256 };
        } else body = mail.body;
        const input: MessageInput = {
          queueId: mail.queueId,
          mailFrom: mail.envelope.mailFrom,
          receivedAt: mail.receivedAt,
          source: mail.source,
          body,
          ...(spooled ? { spool: { stream: hctx.stream, seq: hctx.seq } } : {}),
          ...(mail.messageId ? { messageId: mail.messageId } : {}),
          ...(traceparent ? { traceparent } : {}),
          smtputf8: mail.envelope.smtputf8,
          bodyType: mail.envelope.bodyType,
          ...(mail.dsn ? { dsn: mail.dsn } : {}),
          ...(mail.envelope.dsn?.envid ? { envid: mail.envelope.dsn.envid } : {}),
          ...(mail.envelope.dsn?.ret ? { ret: mail.envelope.dsn.ret } : {}),
          notices,
        };
        const stored = await ctx.queue.createMessage(input, planned, now);
        const msg: OutcomeMessage & DispatchMessage = {
          queueId: mail.queueId,
          receivedAt: mail.receivedAt,
          mailFrom: mail.envelope.mailFrom,
          source: mail.source,
          notices,
          body,
          ...(hctx.attachment ? { attachment: hctx.attachment } : {}),
          smtputf8: mail.envelope.smtputf8,
          bodyType: mail.envelope.bodyType,
          envid: mail.envelope.dsn?.envid,
          ret: mail.envelope.dsn?.ret,
        };

        if (stored.status === "finished") {
          log.info("message already finished: nothing to route");
          return;
        }
        const firstTime = stored.status !== "exists";
        if (firstTime) reportRouteBounces(ctx, msg, planned);
        if (firstTime) {
          // addresses the aliases led to: `mailctl track friend@remote.test` finds the message too
          const expanded = planned
            .filter((r) => r.original && r.original !== r.address)
            .map((r) => r.address);
          if (expanded.length > 0) ctx.bus.index(mail.queueId, { addresses: expanded });
        }
        if (stored.status === "finalized") {
          observeFinal(ctx, mail.queueId, mail.receivedAt);
          return;
        }
        if (!firstTime) log.info("message routed before (redelivery): resuming");

        const pending = stored.recipients.filter((r) => r.state === "pending" && r.attempt === 1);
        // held by the operator (mailctl queue hold): kept in the schedule, not dispatched
        const domainOf = (r: RecipientRecord) => r.domain ?? r.address.slice(r.address.lastIndexOf("@") + 1);
        const held = pending.filter((r) => ctx.holds.held(mail.queueId, domainOf(r)));
        if (held.length > 0) {
          const n = await ctx.queue.holdPending(
            mail.queueId,
            held.map((r) => r.rid),
            ctx.now(),
          );
          if (n > 0) {
            ctx.bus.emit({
              type: "held",
              queueId: mail.queueId,
              recipients: held.map((r) => r.address),
              detail: "on hold (mailctl queue release lets it go)",
            });
          }
        }
        const heldIds = new Set(held.map((r) => r.rid));
        const waiting = pending.filter((r) => !heldIds.has(r.rid));
        const local = waiting.filter((r) => r.kind === "local");
        const remote = groupBy(
          waiting.filter((r) => r.kind === "remote" && r.domain),
          (r) => r.domain!,
        );

        if (local.length > 0) {
          // stamped before the publish: the mda may report before this event is emitted
          const at = new Date().toISOString();
          const published = await publishLocal(ctx, msg, local, { retry: false });
          await ctx.queue.recordDispatch(mail.queueId, dispatchSeqs(published));
          ctx.metrics.routed.inc({ kind: "local" }, local.length);
          ctx.bus.emit({
            type: "routed",
            at,
            queueId: mail.queueId,
            recipients: local.map((r) => r.address),
            attempt: 1,
            detail: `local delivery (${published.map((p) => p.dispatchId).join(", ")})`,
          });
        }
        await mapLimit([...remote], DOMAIN_CONCURRENCY, ([domain, rcpts]) =>
          routeDomain(ctx, msg, domain, rcpts),
        );
        log.info(
          {
            recipients: stored.recipients.length,
            local: local.length,
            remoteDomains: remote.size,
          },
          "message routed",
        );
      },
    );
  };
}

/** Events and counts for recipients that bounced before any attempt (unknown users, loops). */
function reportRouteBounces(ctx: RouterContext, msg: OutcomeMessage, planned: RecipientRecord[]): void {
  for (const r of planned) {
    if (r.state !== "bounced" || !r.lastReply) continue;
    ctx.metrics.routed.inc({ kind: "bounce" });
    ctx.metrics.final.inc({ state: "bounced" });
    ctx.bus.emit({
      type: "bounced",
      queueId: msg.queueId,
      recipient: r.address,
      reply: r.lastReply,
      attempt: 1,
    });
    ctx.telemetry.log.info({ recipient: r.address, reply: r.lastReply }, "recipient bounced at routing");
    if (!msg.notices) {
      ctx.metrics.dsn.inc({ kind: "suppressed" });
      ctx.bus.emit({
        type: "dsn",
        queueId: msg.queueId,
        recipient: r.address,
        reply: r.lastReply,
        detail: "not sent: the message has a null envelope sender or is a DSN",
      });
    }
  }
}

/** Resolves one destination and publishes its request(s), or bounces / defers its recipients. */
async function routeDomain(
  ctx: RouterContext,
  msg: OutcomeMessage & DispatchMessage,
  domain: string,
  rcpts: RecipientRecord[],
): Promise<void> {
  const hosts = await lookupMailHosts(ctx, domain);
  const at = new Date(ctx.now()).toISOString();
  if (hosts.kind === "hosts") {
    const at = new Date().toISOString(); // before the publish: delivery may report first
    const mxHosts = toMxHosts(hosts);
    const dest = ctx.admission.destination(domain, mxHosts);
    const published = await publishRemote(ctx, msg, domain, mxHosts, rcpts, {
      retry: false,
      admit: (id, part) => ctx.admission.admitFirst(dest, id, msg.queueId, part),
    });
    // the watchdog looks the request up by this before it dispatches a silent recipient again, and
    // the admission loop before it gives back a slot whose lease ran out
    await ctx.queue.recordDispatch(msg.queueId, dispatchSeqs(published), publishedSlots(published));
    ctx.metrics.routed.inc({ kind: "remote" }, rcpts.length);
    const sent = new Set(published.flatMap((p) => p.rids));
    const going = rcpts.filter((r) => sent.has(r.rid));
    const waiting = rcpts.filter((r) => !sent.has(r.rid));
    const via = hosts.hosts.map((h) => h.exchange).join(", ");
    if (going.length > 0) {
      ctx.bus.emit({
        type: "routed",
        at,
        queueId: msg.queueId,
        recipients: going.map((r) => r.address),
        destination: domain,
        attempt: 1,
        detail: `remote delivery via ${via} (${published.map((p) => p.dispatchId).join(", ")})`,
      });
    }
    if (waiting.length > 0) {
      ctx.bus.emit({
        type: "routed",
        at,
        queueId: msg.queueId,
        recipients: waiting.map((r) => r.address),
        destination: domain,
        attempt: 1,
        detail: `remote delivery via ${via}: waiting for a slot (${dest.policy.connections} transactions at once${
          dest.policy.rate ? `, ${dest.policy.rate.messages} per ${dest.policy.rate.perMs / 1000} s` : ""
        } to these hosts)`,
      });
    }
    return;
  }
  if (hosts.kind === "temp") {
    ctx.telemetry.log.warn({ domain, err: hosts.error.message }, "MX lookup failed temporarily");
    const patch = { lastReply: replies.dnsTempFail(domain), lastAttemptAt: at };
    for (const r of rcpts) await deferRecipient(ctx, msg, r, patch);
    return;
  }
  const reply = hosts.kind === "nullmx" ? replies.nullMx(domain) : replies.domainNotFound(domain);
  for (const r of rcpts) {
    const res = await finishRecipient(
      ctx,
      msg,
      r,
      "bounced",
      { lastReply: reply, lastAttemptAt: at },
      { dsn: true },
    );
    if (res.status === "ok") ctx.metrics.routed.inc({ kind: "bounce" });
  }
}
