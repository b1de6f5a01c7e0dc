import {
  decodeJson,
  isQueueId,
  type MailEvent,
  MailEvent as MailEventSchema,
  queueIdTime,
  topology,
} from "@mailpipe/contracts";
import { DeliverPolicy, jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { CommandError, type Io, out, UsageError } from "./io.ts";

export type Query =
  | { kind: "queueId"; value: string }
  | { kind: "messageId"; value: string }
  | { kind: "recipient"; value: string };

export function parseQuery(q: string): Query {
  const v = q.trim();
  if (isQueueId(v.toUpperCase())) return { kind: "queueId", value: v.toUpperCase() };
  if (v.startsWith("<") && v.endsWith(">")) return { kind: "messageId", value: v };
  if (/^[^\s@<>]+@[^\s@<>]+$/.test(v)) return { kind: "recipient", value: v.toLowerCase() };
  throw new UsageError(`"${q}" is not a queue id, a <Message-ID> or an address`);
}

/** Reads events from `since` on; stops at the end of the stream (or after `max` events). */
export async function readEvents(nc: NatsConnection, since: Date, max = 1_000_000): Promise<MailEvent[]> {
  const js = jetstream(nc);
  const consumer = await js.consumers.get(topology.streams.events.name, {
    deliver_policy: DeliverPolicy.StartTime,
    opt_start_time: since.toISOString(),
  });
  const events: MailEvent[] = [];
  if ((await consumer.info()).num_pending === 0) return events;
  for (;;) {
    // a fetch waits for its whole batch until it expires, so leave as soon as the stream is read
    const batch = await consumer.fetch({ max_messages: 1000, expires: 2000 });
    let got = 0;
    let pending = 0;
    for await (const m of batch) {
      got++;
      pending = m.info.pending;
      try {
        events.push(decodeJson(MailEventSchema, m.data, "event"));
      } catch {
        // an event of another version: skip it rather than fail the whole timeline
      }
      if (events.length >= max || pending === 0) break;
    }
    if (got === 0 || pending === 0 || events.length >= max) return events;
  }
}

const matches = (q: Query, e: MailEvent): boolean =>
  q.kind === "queueId"
    ? e.queueId === q.value
    : q.kind === "messageId"
      ? e.messageId === q.value
      : e.recipient?.toLowerCase() === q.value ||
        (e.recipients ?? []).some((r) => r.toLowerCase() === q.value) ||
        e.mailFrom?.toLowerCase() === q.value;

export interface Timeline {
  queueId: string;
  messageId?: string;
  mailFrom?: string;
  traceIds: string[];
  events: MailEvent[];
}

/** Groups the matching messages' events into one timeline per queue id, oldest first. */
export function timelines(q: Query, events: MailEvent[]): Timeline[] {
  const ids = new Set(events.filter((e) => matches(q, e) && e.queueId).map((e) => e.queueId!));
  const out: Timeline[] = [];
  for (const queueId of [...ids].sort()) {
    const evs = events.filter((e) => e.queueId === queueId).sort((a, b) => a.at.localeCompare(b.at));
    const first = evs.find((e) => e.messageId) ?? evs[0];
    out.push({
      queueId,
      ...(first?.messageId ? { messageId: first.messageId } : {}),
      ...(evs.find((e) => e.mailFrom !== undefined)?.mailFrom !== undefined
        ? { mailFrom: evs.find((e) => e.mailFrom !== undefined)!.mailFrom! }
        : {}),
      traceIds: [...new Set(evs.map((e) => e.traceId).filter((t): t is string => !!t))],
      events: evs,
    });
  }
  return out;
}

function describe(e: MailEvent): string {
  const parts: string[] = [];
  if (e.recipient) parts.push(e.recipient);
  else if (e.recipients?.length) parts.push(e.recipients.join(", "));
  if (e.type === "received" && e.client)
    parts.push(`from ${e.client.ip}${e.client.helo ? ` (${e.client.helo})` : ""}`);
  if (e.type === "received" && e.mailFrom !== undefined) parts.push(`sender <${e.mailFrom}>`);
  if (e.size !== undefined) parts.push(`${e.size} bytes`);
  if (e.destination) parts.push(`→ ${e.destination}`);
  if (e.attempt !== undefined && e.attempt > 1) parts.push(`attempt ${e.attempt}`);
  if (e.reply) parts.push(`"${e.reply.code} ${e.reply.enhanced} ${e.reply.text}"`);
  if (e.remoteMta) parts.push(`by ${e.remoteMta}`);
  if (e.tls) {
    const session = e.tls.version ? `${e.tls.version} ${e.tls.cipher ?? ""}`.trim() : "no TLS";
    const policy = e.tls.source === "default" ? e.tls.policy : `${e.tls.policy}, ${e.tls.source}`;
    parts.push(`${session} (${policy}${e.tls.verified ? ", verified" : ""})`);
  }
  if (e.detail) parts.push(e.detail);
  return parts.join("  ");
}

export function printTimelines(io: Io, list: Timeline[], traceUrl?: string): void {
  for (const t of list) {
    out(
      io,
      `message ${t.queueId}${t.messageId ? `  Message-ID ${t.messageId}` : ""}${t.mailFrom !== undefined ? `  from <${t.mailFrom}>` : ""}`,
    );
    for (const e of t.events) {
      const when = e.at.replace("T", " ").replace(/Z$/, "");
      out(io, `  ${when}  ${e.service.padEnd(8)} ${e.type.padEnd(9)} ${describe(e)}`);
    }
    for (const id of t.traceIds)
      out(io, `  trace ${id}${traceUrl ? `  ${traceUrl.replace("{traceId}", id)}` : ""}`);
    out(io);
  }
}

/** `mailctl track <queue id | <Message-ID> | address> [--since 24h] [--json]` */
export async function trackCommand(
  nc: NatsConnection,
  query: string,
  opts: { sinceMs: number; json: boolean },
  io: Io,
): Promise<void> {
  const q = parseQuery(query);
  // a queue id carries its time: start a minute before it instead of scanning the whole window
  const since =
    q.kind === "queueId" ? new Date(queueIdTime(q.value) - 60_000) : new Date(Date.now() - opts.sinceMs);
  const list = timelines(q, await readEvents(nc, since));
  if (list.length === 0) {
    throw new CommandError(
      `no events for ${query} since ${since.toISOString()} (try a longer --since; events are kept for EVENTS_MAX_AGE)`,
    );
  }
  if (opts.json) out(io, JSON.stringify(list, null, 2));
  else printTimelines(io, list, io.env.TRACE_VIEW_URL);
}
