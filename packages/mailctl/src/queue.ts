import { formatReply, isQueueId, normalizeDomain } from "@mailpipe/contracts";
import { type HoldRule, MailQueue } from "@mailpipe/queue";
import { CommandError, type Io, out, UsageError } from "./io.ts";
import { withRedis } from "./redis.ts";

function withQueue<T>(io: Io, fn: (q: MailQueue) => Promise<T>): Promise<T> {
  return withRedis(io, (redis) =>
    fn(new MailQueue(redis, io.env.QUEUE_PREFIX ? { prefix: io.env.QUEUE_PREFIX } : {})),
  );
}

function ago(iso: string, now = Date.now()): string {
  const s = Math.round((Date.parse(iso) - now) / 1000);
  const abs = Math.abs(s);
  if (abs < 1) return "just now";
  const text = abs < 120 ? `${abs}s` : abs < 7200 ? `${Math.round(abs / 60)}m` : `${Math.round(abs / 3600)}h`;
  return s >= 0 ? `in ${text}` : `${text} ago`;
}

/** `mailctl queue [list|flush|delete <id>]` over the router's schedule in Redis. */
export async function queueCommand(
  args: string[],
  flags: {
    json?: boolean | undefined;
    bounce?: boolean | undefined;
    drop?: boolean | undefined;
    limit?: string | undefined;
    destination?: string | undefined;
    all?: boolean | undefined;
  },
  io: Io,
): Promise<void> {
  const [action = "list", id] = args;
  if (action === "list") {
    await withQueue(io, async (q) => {
      const [entries, stats] = await Promise.all([
        q.listScheduled({ limit: Number(flags.limit ?? 100) }),
        q.stats(),
      ]);
      if (flags.json) {
        out(io, JSON.stringify({ stats, scheduled: entries }, null, 2));
        return;
      }
      const holds = await q.holds();
      if (holds.length > 0) out(io, `on hold: ${holds.map(describeHold).join(", ")}`);
      if (entries.length === 0) {
        out(io, `no scheduled retries (${stats.inFlight} being dispatched)`);
        return;
      }
      out(
        io,
        `${stats.scheduled} scheduled, ${stats.inFlight} being dispatched${stats.oldestReceivedAt ? `, oldest message received ${ago(stats.oldestReceivedAt)}` : ""}`,
      );
      for (const e of entries) {
        out(io, `${e.id}`);
        out(
          io,
          `    ${e.recipient} → ${e.destination}  attempts ${e.attempts}  ${e.held ? "HELD (mailctl queue release)" : `next ${e.nextAttemptAt} (${ago(e.nextAttemptAt)})`}${e.mark ? `  marked: ${e.mark}` : ""}`,
        );
        if (e.lastReply) out(io, `    last reply: ${formatReply(e.lastReply)}`);
      }
    });
    return;
  }
  if (action === "flush") {
    const n = await withQueue(io, (q) => q.flushScheduled());
    out(io, `${n} scheduled ${n === 1 ? "retry is" : "retries are"} due now`);
    return;
  }
  if (action === "delete") {
    if (!id) throw new UsageError("usage: mailctl queue delete <id> [--bounce|--drop]");
    if (flags.bounce && flags.drop) throw new UsageError("choose one of --bounce and --drop");
    const mode = flags.drop ? "drop" : "bounce";
    const r = await withQueue(io, (q) => q.deleteScheduled(id, { action: mode }));
    if (r === "not-found") throw new CommandError(`no scheduled retry ${id} (see "mailctl queue")`);
    if (r === "in-flight")
      throw new CommandError(`${id} is being dispatched right now; try again in a few seconds`);
    out(
      io,
      mode === "bounce" ? `${id} will be bounced to its sender now` : `${id} is dropped (no bounce is sent)`,
    );
    return;
  }
  if (action === "hold" || action === "release") {
    const rule = holdRule(action, id, flags);
    if (action === "hold") {
      const n = await withQueue(io, (q) => q.hold(rule));
      out(
        io,
        `on hold: ${describeHold(rule)} (${n} scheduled ${n === 1 ? "retry" : "retries"} set aside now; new mail to it is kept too, until "mailctl queue release")`,
      );
    } else {
      const n = await withQueue(io, (q) => q.release(rule));
      out(
        io,
        `released: ${describeHold(rule)} (${n} held ${n === 1 ? "retry" : "retries"} back in the schedule)`,
      );
    }
    return;
  }
  throw new UsageError(`unknown queue action "${action}"`);
}

function holdRule(
  action: string,
  id: string | undefined,
  flags: { destination?: string | undefined; all?: boolean | undefined },
): HoldRule {
  const usage = `usage: mailctl queue ${action} <queue id> | --destination <domain> | --all`;
  const given = [id !== undefined, flags.destination !== undefined, !!flags.all].filter(Boolean).length;
  if (given !== 1) throw new UsageError(usage);
  if (flags.all) return { kind: "all" };
  if (flags.destination !== undefined) {
    const domain = normalizeDomain(flags.destination);
    if (domain === null) throw new UsageError(`"${flags.destination}" is not a domain name`);
    return { kind: "destination", domain };
  }
  const q = id!.toUpperCase();
  if (!isQueueId(q)) throw new UsageError(`"${id}" is not a queue id (${usage})`);
  return { kind: "message", queueId: q };
}

function describeHold(r: HoldRule): string {
  return r.kind === "all"
    ? "everything"
    : r.kind === "destination"
      ? `mail to ${r.domain}`
      : `message ${r.queueId}`;
}
