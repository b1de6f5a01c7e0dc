import {
  decodeJson,
  isQueueId,
  type MailEvent,
  MailEvent as MailEventSchema,
  queueIdTime,
  subjects,
  topology,
  trackHash,
} from "@mailpipe/contracts";
// the light entry: `mailctl track` does not load the service runtime
import { mapLimit } from "@mailpipe/service-kit/map-limit";
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

/** How many stream messages a lookup received (a lookup must not read the whole stream). */
export interface ReadStats {
  read: number;
}

/**
 * Reads the messages of MAIL_EVENTS on `filter` (one subject, wildcards allowed), from `since` on
 * when given; stops at the end of the stream or after `max`. The server does the filtering, so this
 * receives only matching messages.
 */
async function readFiltered(
  nc: NatsConnection,
  filter: string | undefined,
  opts: { since?: Date; max: number; stats?: ReadStats },
): Promise<Uint8Array[]> {
  const js = jetstream(nc);
  const consumer = await js.consumers.get(topology.streams.events.name, {
    ...(filter ? { filter_subjects: filter } : {}),
    ...(opts.since
      ? { deliver_policy: DeliverPolicy.StartTime, opt_start_time: opts.since.toISOString() }
      : { deliver_policy: DeliverPolicy.All }),
  });
  const out: Uint8Array[] = [];
  if ((await consumer.info()).num_pending === 0) return out;
  for (;;) {
    // a fetch waits for its whole batch until it expires, so leave as soon as the stream is read
    const batch = await consumer.fetch({ max_messages: 1000, expires: 2000 });
    let got = 0;
    let pending = 0;
    for await (const m of batch) {
      got++;
      if (opts.stats) opts.stats.read++;
      pending = m.info.pending;
      out.push(m.data);
      if (out.length >= opts.max || pending === 0) break;
    }
    if (got === 0 || pending === 0 || out.length >= opts.max) return out;
  }
}

function decodeEvents(data: readonly Uint8Array[]): MailEvent[] {
  const events: MailEvent[] = [];
  for (const d of data) {
    try {
      events.push(decodeJson(MailEventSchema, d, "event"));
    } catch {
      // an event of another version: skip it rather than fail the whole timeline
    }
  }
  return events;
}

/** Every event from `since` on (`--scan`: what tracking did before the index; reads everything). */
export async function readEvents(
  nc: NatsConnection,
  since: Date,
  max = 1_000_000,
  stats?: ReadStats,
): Promise<MailEvent[]> {
  return decodeEvents(
    await readFiltered(nc, subjects.eventsAll(), { since, max, ...(stats ? { stats } : {}) }),
  );
}

/**
 * One message's events: a read of one literal subject (its queue id's bucket), which holds on
 * average (events kept) / 65,536 events.
 */
export async function eventsOfMessage(
  nc: NatsConnection,
  queueId: string,
  stats?: ReadStats,
): Promise<MailEvent[]> {
  const data = await readFiltered(nc, subjects.eventsOfMessage(queueId), {
    max: 10_000,
    ...(stats ? { stats } : {}),
  });
  return decodeEvents(data).filter((e) => e.queueId === queueId);
}

/** The queue ids the index holds for a Message-ID or an address since `since`, newest last. */
export async function indexedQueueIds(
  nc: NatsConnection,
  q: Exclude<Query, { kind: "queueId" }>,
  since: Date,
  stats?: ReadStats,
): Promise<string[]> {
  const kind = q.kind === "messageId" ? "mid" : "addr";
  const hash = trackHash(kind, q.value);
  const data = await readFiltered(nc, subjects.trackIndex(kind, q.value), {
    since,
    max: 1_000_000,
    ...(stats ? { stats } : {}),
  });
  const ids = new Set<string>();
  const text = new TextDecoder();
  for (const d of data) {
    // `<key hash> <queue id>`: the bucket also holds other keys' entries
    const [h, id] = text.decode(d).trim().split(" ");
    if (h === hash && id && isQueueId(id)) ids.add(id);
  }
  return [...ids].sort();
}

/** At most this many messages are shown for one Message-ID or address (the newest). */
export const TRACK_MAX_MESSAGES = 50;

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

/**
 * Where an event stands in a message's life: what the accepting service says (received, rejected,
 * filtered, then queued) comes before anything downstream. The edge emits `queued` once JetStream
 * acked the message, and the router may route it before that ack arrives, so time alone would show
 * "routed" before "queued".
 */
function phase(e: MailEvent): number {
  switch (e.type) {
    case "received":
    case "rejected":
    case "filtered":
      return 0;
    case "queued":
      return 1;
    default:
      return 2;
  }
}

/**
 * Groups the matching messages' events into one timeline per queue id: the accepting service's
 * events first, then the rest oldest first.
 */
export function timelines(
  q: Query,
  events: MailEvent[],
  match: (e: MailEvent) => boolean = (e) => matches(q, e),
): Timeline[] {
  const ids = new Set(events.filter((e) => match(e) && e.queueId).map((e) => e.queueId!));
  const out: Timeline[] = [];
  for (const queueId of [...ids].sort()) {
    const evs = events
      .filter((e) => e.queueId === queueId)
      .sort((a, b) => phase(a) - phase(b) || a.at.localeCompare(b.at));
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
  if (e.filter) {
    const f = e.filter;
    const score =
      f.score !== undefined
        ? `  score ${f.score.toFixed(2)}${f.required !== undefined ? `/${f.required.toFixed(2)}` : ""}`
        : "";
    parts.push(
      `rspamd: ${f.action}${score}${f.symbols?.length ? `  [${f.symbols.slice(0, 5).join(" ")}]` : ""}`,
    );
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

/** Timelines for known queue ids, oldest message first. */
export function timelinesOf(queueIds: readonly string[], events: MailEvent[]): Timeline[] {
  const wanted = new Set(queueIds);
  return timelines(
    { kind: "queueId", value: "" },
    events.filter((e) => e.queueId && wanted.has(e.queueId)),
    (e) => !!e.queueId && wanted.has(e.queueId),
  );
}

/**
 * `mailctl track <queue id | <Message-ID> | address> [--since 24h] [--json] [--scan]`: a queue id's
 * events are a subject-filtered read; a Message-ID or an address is looked up in the tracking index
 * first. `--scan` reads every event in the window instead (events from before the index existed).
 */
export async function trackCommand(
  nc: NatsConnection,
  query: string,
  opts: { sinceMs: number; json: boolean; scan?: boolean },
  io: Io,
): Promise<void> {
  const q = parseQuery(query);
  let list: Timeline[];
  let since: Date;
  if (opts.scan) {
    // a queue id carries its time: start a minute before it instead of scanning the whole window
    since =
      q.kind === "queueId" ? new Date(queueIdTime(q.value) - 60_000) : new Date(Date.now() - opts.sinceMs);
    list = timelines(q, await readEvents(nc, since));
  } else {
    since = new Date(Date.now() - opts.sinceMs);
    let ids: string[];
    if (q.kind === "queueId") ids = [q.value];
    else {
      ids = await indexedQueueIds(nc, q, since);
      if (ids.length > TRACK_MAX_MESSAGES) {
        io.stderr.write(
          `${ids.length} messages match ${query}; showing the newest ${TRACK_MAX_MESSAGES} (narrow --since)\n`,
        );
        ids = ids.slice(-TRACK_MAX_MESSAGES);
      }
    }
    const events = (await mapLimit(ids, 8, (id) => eventsOfMessage(nc, id))).flat();
    list = timelinesOf(ids, events);
  }
  if (list.length === 0) {
    throw new CommandError(
      opts.scan
        ? `no events for ${query} since ${since.toISOString()} (try a longer --since; events are kept for EVENTS_MAX_AGE)`
        : `no events for ${query} in the tracking index${q.kind === "queueId" ? "" : ` since ${since.toISOString()}`} (try a longer --since; events from before the index are found with --scan)`,
    );
  }
  if (opts.json) out(io, JSON.stringify(list, null, 2));
  else printTimelines(io, list, io.env.TRACE_VIEW_URL);
}
