// Runs the scheduler's DSN tasks: collect the recipients to report, build the report (dsn.ts),
// store it, and queue it as a new message from the null sender.
import { createHash } from "node:crypto";
import { newQueueId, QueuedMail, subjects } from "@mailpipe/contracts";
import type { DsnJob, MessageRecord, RecipientRecord } from "@mailpipe/queue";
import { attr, inSpan, SpanKind } from "@mailpipe/telemetry";
import { context } from "@opentelemetry/api";
import type { RouterContext } from "./deps.ts";
import {
  buildDsn,
  type DsnAction,
  type DsnKind,
  type DsnRecipient,
  dsnStatus,
  readHeaderBlock,
} from "./dsn.ts";
import { observeFinal } from "./outcomes.ts";
import { expiresAt } from "./retry-policy.ts";
import { contextFromTraceparent } from "./trace.ts";

function toDsnRecipient(
  r: RecipientRecord,
  action: DsnAction,
  willRetryUntil: Date | undefined,
): DsnRecipient {
  return {
    finalRecipient: r.address,
    ...(r.original && r.original !== r.address ? { originalRecipient: r.original } : {}),
    action,
    status: dsnStatus(action, r.lastReply),
    // a local "remote MTA" would be us: RFC 3464 wants the host that answered, so only for remote
    ...(r.kind === "remote" && r.remoteMta ? { remoteMta: r.remoteMta } : {}),
    ...(r.lastReply ? { diagnostic: r.lastReply } : {}),
    ...(r.lastAttemptAt ? { lastAttemptDate: new Date(r.lastAttemptAt) } : {}),
    ...(willRetryUntil ? { willRetryUntil } : {}),
  };
}

/**
 * Which recipients a DSN of this kind reports, now. The "failure" task reports every final state
 * the recipients asked to hear of: failures, and deliveries with NOTIFY=SUCCESS.
 */
async function choose(ctx: RouterContext, job: DsnJob, recipients: RecipientRecord[]): Promise<string[]> {
  if (job.dsnKind === "failure") {
    const waiting = new Set(await ctx.queue.pendingFinalReports(job.queueId));
    return recipients.filter((r) => waiting.has(r.rid)).map((r) => r.rid);
  }
  // a delay notice covers the recipients still waiting that have been deferred at least once
  return recipients
    .filter((r) => r.state === "pending" && r.notifyDelay && r.lastReply && r.attempt > 1)
    .map((r) => r.rid);
}

/**
 * Builds and queues one DSN. The report's queue id and its recipients are stored on the task
 * before anything is published, so a task retried after a crash republishes the same report under
 * the same Nats-Msg-Id instead of a second one.
 */
export async function runDsnTask(ctx: RouterContext, job: DsnJob): Promise<void> {
  const { log, tracer } = ctx.telemetry;
  const state = await ctx.queue.getMessage(job.queueId);
  if (!state) {
    await ctx.queue.completeDsn(job, job.dsnKind, [], ctx.now());
    return;
  }
  const { message } = state;
  const chosen = job.prepared.dsnQueueId ? [] : await choose(ctx, job, state.recipients);
  const prepared = await ctx.queue.prepareTask(job, {
    dsnQueueId: newQueueId(),
    successQueueId: newQueueId(),
    rids: JSON.stringify(chosen),
  });
  if (!prepared) {
    log.warn({ job: job.id }, "DSN task lease lost: another router has it");
    return;
  }
  const rids = JSON.parse(prepared.rids ?? "[]") as string[];
  const byRid = new Map(state.recipients.map((r) => [r.rid, r]));
  const reported = rids.map((rid) => byRid.get(rid)).filter((r): r is RecipientRecord => r !== undefined);
  const delivered = reported.filter((r) => r.state === "delivered");
  const reports: [DsnKind, string, RecipientRecord[]][] =
    job.dsnKind === "delay"
      ? [["delay", prepared.dsnQueueId!, reported]]
      : [
          ["failure", prepared.dsnQueueId!, reported.filter((r) => r.state !== "delivered")],
          ["success", prepared.successQueueId!, delivered],
        ];

  for (const [kind, dsnQueueId, list] of reports) {
    if (list.length === 0 || !message.notices || message.mailFrom === "") continue;
    await context.with(contextFromTraceparent(message.traceparent), () =>
      inSpan(
        tracer,
        "dsn.build",
        {
          kind: SpanKind.PRODUCER,
          attributes: {
            [attr.queueId]: job.queueId,
            [attr.outcome]: kind,
            [attr.recipientCount]: list.length,
          },
        },
        () => sendDsn(ctx, message, kind, dsnQueueId, list),
      ),
    );
  }
  const done = await ctx.queue.completeDsn(job, job.dsnKind, rids, ctx.now());
  if (done.status === "ok" && done.finalized) observeFinal(ctx, job.queueId, done.finalized);
}

/** Largest original returned whole (RET=FULL); the report must fit the spool's attachment. */
export const RET_FULL_MAX = 256 * 1024;

async function readWhole(ctx: RouterContext, message: MessageRecord): Promise<Buffer> {
  const stream = await ctx.bodies.read(message.body);
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/** A success notice says "delivered" for a mailbox, "relayed" for a next hop without DSN. */
function actionOf(kind: DsnKind, r: RecipientRecord): DsnAction {
  if (kind === "failure") return "failed";
  if (kind === "delay") return "delayed";
  return r.kind === "local" ? "delivered" : "relayed";
}

async function sendDsn(
  ctx: RouterContext,
  message: MessageRecord,
  kind: DsnKind,
  dsnQueueId: string,
  reported: RecipientRecord[],
): Promise<void> {
  const { log } = ctx.telemetry;
  const until = kind === "delay" ? new Date(expiresAt(ctx.policy, message.receivedAt)) : undefined;
  let headers: Buffer | undefined;
  let full: Buffer | undefined;
  try {
    // RET=FULL returns the whole message with a failure report when it is small enough for the
    // report to travel as its spool message's attachment; otherwise, and for RET=HDRS, delay
    // and success notices and no RET, the headers only (RFC 3461 4.3 leaves the default to the
    // MTA; success notices return no more than the headers, as Postfix does)
    if (kind === "failure" && message.ret === "FULL" && message.body.size <= RET_FULL_MAX) {
      full = await readWhole(ctx, message);
    } else {
      headers = await readHeaderBlock(ctx.bodies, message.body);
    }
  } catch (err) {
    // the report still tells the sender what failed; only the returned headers are missing
    log.warn({ err: (err as Error).message }, "could not read the original headers for the DSN");
  }
  const host = ctx.config.MAIL_HOSTNAME;
  const now = new Date(ctx.now());
  const built = buildDsn({
    kind,
    reportingMta: host,
    to: message.mailFrom,
    queueId: message.queueId,
    ...(message.envid ? { envid: message.envid } : {}),
    arrivalDate: new Date(message.receivedAt),
    recipients: reported.map((r) => toDsnRecipient(r, actionOf(kind, r), until)),
    ...(headers ? { headers } : {}),
    ...(full ? { message: full } : {}),
    date: now,
    messageId: `${dsnQueueId}@${host}`,
  });
  // The report travels as its spool message's attachment. A retried task (after a crash or a lost
  // ack) builds it again under the same queue id and Nats-Msg-Id: within the duplicate window
  // JetStream stores it once, and later the router finds the report's state already in Redis.
  const raw = built.raw;
  const mail: QueuedMail = {
    v: 1,
    queueId: dsnQueueId,
    source: "dsn",
    receivedAt: now.toISOString(),
    envelope: {
      mailFrom: "",
      rcptTo: [{ address: message.mailFrom }],
      smtputf8: built.utf8Address,
      bodyType: built.eightBit ? "8BITMIME" : "7BIT",
    },
    body: { attached: true, size: raw.length, sha256: createHash("sha256").update(raw).digest("hex") },
    messageId: `<${dsnQueueId}@${host}>`,
    dsn: { of: message.queueId, kind },
  };
  await ctx.bus.publish(subjects.queued(), QueuedMail, mail, { msgId: dsnQueueId, attachment: raw });
  ctx.metrics.dsn.inc({ kind });
  const recipients = reported.map((r) => r.address);
  ctx.bus.emit({
    type: "dsn",
    queueId: message.queueId,
    recipient: message.mailFrom,
    recipients,
    detail: `${kind} DSN queued as ${dsnQueueId}`,
  });
  if (kind === "delay") {
    ctx.bus.emit({
      type: "delayed",
      queueId: message.queueId,
      recipients,
      detail: `delay notice sent to the sender; retrying until ${until?.toISOString()}`,
    });
  }
  log.info({ dsnQueueId, kind, to: message.mailFrom, recipients }, "DSN queued");
}
