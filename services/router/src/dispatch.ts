// Building and publishing delivery requests, for first attempts (route.ts) and retries (scheduler.ts).
import { createHash } from "node:crypto";
import {
  type BodyRef,
  destinationToken,
  LocalDeliveryRequest,
  type MxHost,
  RemoteDeliveryRequest,
  type RequestSlot,
  subjects,
} from "@mailpipe/contracts";
import { type MailHosts, resolveMailHosts } from "@mailpipe/dns";
import type { RecipientRecord } from "@mailpipe/queue";
import { attr, inSpan, SpanKind } from "@mailpipe/telemetry";
import type { RouterContext } from "./deps.ts";

/** A request carries at most this many recipients (the contract's limit for remote requests). */
export const MAX_RECIPIENTS_PER_REQUEST = 1000;

/**
 * Bodies up to this size travel with the first attempt's requests (the spool message's attachment,
 * which the router holds anyway): the worker reads nothing from the store. Larger ones, and every
 * retry, are read by the worker from the reference.
 */
export const REQUEST_ATTACH_MAX = 16 * 1024;

/** What a request needs from the message. */
export interface DispatchMessage {
  queueId: string;
  receivedAt: string;
  mailFrom: string;
  body: BodyRef;
  /** the body's bytes, when the router has them (a first attempt from the spool) */
  attachment?: Buffer;
  smtputf8: boolean;
  bodyType: "7BIT" | "8BITMIME";
  /** RFC 3461 ENVID and RET, when the sender gave them: remote requests pass them on */
  envid?: string | undefined;
  ret?: "FULL" | "HDRS" | undefined;
}

/** The sender's RET and ENVID for a remote request, when it gave any. */
function envelopeDsn(msg: DispatchMessage): Pick<RemoteDeliveryRequest, "dsn"> {
  if (!msg.envid && !msg.ret) return {};
  return { dsn: { ...(msg.ret ? { ret: msg.ret } : {}), ...(msg.envid ? { envid: msg.envid } : {}) } };
}

/** One request published: its dispatch id, where MAIL_DELIVER stored it, and the recipients in it. */
export interface Published {
  dispatchId: string;
  /** the stream sequence from JetStream's ack (a deduplicated publish names the stored original) */
  seq: number;
  rids: string[];
  /** the destination slot the request went out with (remote requests) */
  slot?: RequestSlot;
}

/** The destination slots the published requests hold, and the request each one went out in. */
export function publishedSlots(
  published: readonly Published[],
): { site: string; token: string; seq: number; dispatchId: string }[] {
  return published.flatMap((p) =>
    p.slot ? [{ site: p.slot.site, token: p.slot.token, seq: p.seq, dispatchId: p.dispatchId }] : [],
  );
}

/** rid → the stream sequence of the request it went out in, as the queue records it. */
export function dispatchSeqs(published: readonly Published[]): { rid: string; seq: number }[] {
  return published.flatMap((p) => p.rids.map((rid) => ({ rid, seq: p.seq })));
}

export function chunk<T>(items: readonly T[], size = MAX_RECIPIENTS_PER_REQUEST): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/**
 * Deterministic dispatch id (and Nats-Msg-Id), so a redelivered message or a re-run job publishes
 * the same id and JetStream stores it once: `<queueId>:<dest>:<attempt>` for a first attempt (with
 * `.<n>` for the n-th chunk past the first). Retries also carry a digest of their recipients: two
 * groups of the same message and attempt claimed in different rounds must not share an id.
 */
export function dispatchId(
  queueId: string,
  dest: string,
  attempt: number,
  opts: { chunk?: number; recipients?: readonly string[] } = {},
): string {
  let id = `${queueId}:${dest}:${attempt}`;
  if (opts.chunk) id += `.${opts.chunk}`;
  if (opts.recipients) {
    const digest = createHash("sha256")
      .update([...opts.recipients].sort().join("\n"))
      .digest("hex");
    id += `:${digest.slice(0, 12)}`;
  }
  return id;
}

/** MX lookup for one destination, in its own span. */
export function lookupMailHosts(ctx: RouterContext, domain: string): Promise<MailHosts> {
  return inSpan(
    ctx.telemetry.tracer,
    "dns.mx",
    { kind: SpanKind.CLIENT, attributes: { [attr.recipientDomain]: domain } },
    async (span) => {
      const result = await resolveMailHosts(ctx.resolver, domain);
      span.setAttribute(attr.outcome, result.kind);
      if (result.kind === "hosts") span.setAttribute(attr.mx, result.hosts.map((h) => h.exchange).join(","));
      return result;
    },
  );
}

export function toMxHosts(result: Extract<MailHosts, { kind: "hosts" }>): MxHost[] {
  return result.hosts.map((h) => ({ exchange: h.exchange, priority: h.priority, addresses: h.addresses }));
}

/**
 * Recipients grouped by the envelope sender their copies go out with, in their order: the message's
 * own, or for addresses an alias of ours forwards to, the sender rewritten with SRS (when the
 * directory configures it), so that SPF passes at the destination. The null sender, and senders in
 * our own domains (our SPF covers them already), are never rewritten.
 */
export function bySender(
  ctx: Pick<RouterContext, "directory" | "now">,
  mailFrom: string,
  recipients: readonly RecipientRecord[],
): [string, RecipientRecord[]][] {
  const dir = ctx.directory();
  const srs = dir.srs();
  const senderDomain = mailFrom.slice(mailFrom.lastIndexOf("@") + 1);
  if (!srs || mailFrom === "" || dir.isLocalDomain(senderDomain)) return [[mailFrom, [...recipients]]];
  const groups = new Map<string, RecipientRecord[]>();
  for (const r of recipients) {
    const sender = r.forwardedBy ? srs.forward(mailFrom, r.forwardedBy, ctx.now()) : mailFrom;
    const g = groups.get(sender);
    if (g) g.push(r);
    else groups.set(sender, [r]);
  }
  return [...groups];
}

function attach(msg: DispatchMessage): { attachment?: Buffer } {
  return msg.attachment && msg.attachment.length <= REQUEST_ATTACH_MAX ? { attachment: msg.attachment } : {};
}

/** Publishes local copies, one request per chunk; resolves once JetStream acked every one. */
export async function publishLocal(
  ctx: RouterContext,
  msg: DispatchMessage,
  recipients: readonly RecipientRecord[],
  opts: { retry: boolean },
): Promise<Published[]> {
  const out: Published[] = [];
  for (const [i, part] of chunk(recipients).entries()) {
    const attempt = Math.max(...part.map((r) => r.attempt));
    const id = dispatchId(msg.queueId, "local", attempt, {
      chunk: i,
      ...(opts.retry ? { recipients: part.map((r) => r.rid) } : {}),
    });
    const request: LocalDeliveryRequest = {
      v: 1,
      queueId: msg.queueId,
      dispatchId: id,
      receivedAt: msg.receivedAt,
      mailFrom: msg.mailFrom,
      recipients: part.map((r) => ({
        mailbox: r.mailbox ?? r.address,
        address: r.address,
        ...(r.folder ? { folder: r.folder } : {}),
        attempt: r.attempt,
      })),
      body: msg.body,
    };
    const ack = await ctx.bus.publish(subjects.deliverLocal(), LocalDeliveryRequest, request, {
      msgId: id,
      ...attach(msg),
    });
    out.push({ dispatchId: id, seq: ack.seq, rids: part.map((r) => r.rid) });
  }
  return out;
}

/**
 * Publishes remote requests for one destination, one per chunk of recipients. With `admit`, each
 * chunk first needs a destination slot: a chunk that gets none is not published (its recipients now
 * wait for one in the schedule) and is missing from the result.
 */
export async function publishRemote(
  ctx: RouterContext,
  msg: DispatchMessage,
  domain: string,
  hosts: MxHost[],
  recipients: readonly RecipientRecord[],
  opts: {
    retry: boolean;
    admit?: (dispatchId: string, part: RecipientRecord[]) => Promise<RequestSlot | null>;
  },
): Promise<Published[]> {
  const out: Published[] = [];
  const dest = destinationToken(domain);
  const parts = bySender(ctx, msg.mailFrom, recipients).flatMap(([mailFrom, list]) =>
    chunk(list).map((part) => ({ mailFrom, part })),
  );
  for (const [i, { mailFrom, part }] of parts.entries()) {
    const attempt = Math.max(...part.map((r) => r.attempt));
    const id = dispatchId(msg.queueId, dest, attempt, {
      chunk: i,
      ...(opts.retry ? { recipients: part.map((r) => r.rid) } : {}),
    });
    const slot = opts.admit ? await opts.admit(id, part) : undefined;
    if (slot === null) continue;
    const request: RemoteDeliveryRequest = {
      v: 1,
      queueId: msg.queueId,
      dispatchId: id,
      receivedAt: msg.receivedAt,
      mailFrom,
      destination: { domain, hosts },
      recipients: part.map((r) => ({
        address: r.address,
        ...(r.original && r.original !== r.address ? { original: r.original } : {}),
        ...(r.notify ? { notify: r.notify } : {}),
        attempt: r.attempt,
      })),
      smtputf8: msg.smtputf8,
      bodyType: msg.bodyType,
      ...envelopeDsn(msg),
      body: msg.body,
      ...(slot ? { slot } : {}),
    };
    const ack = await ctx.bus.publish(subjects.deliverRemote(domain), RemoteDeliveryRequest, request, {
      msgId: id,
      ...attach(msg),
    });
    out.push({ dispatchId: id, seq: ack.seq, rids: part.map((r) => r.rid), ...(slot ? { slot } : {}) });
  }
  return out;
}
