import { createHash } from "node:crypto";
import type { Bus } from "@mailpipe/bus";
import {
  type AttachedBody,
  type Envelope,
  type ObjectBodyRef,
  QueuedMail,
  replies,
  SmtpError,
  subjects,
} from "@mailpipe/contracts";
import { attr, inSpan, SpanKind, type Telemetry } from "@mailpipe/telemetry";

export interface AcceptInput {
  bus: Bus;
  telemetry: Telemetry;
  queueId: string;
  source: "mx" | "msa";
  envelope: Envelope;
  client?: NonNullable<QueuedMail["client"]>;
  /** header fields to put before the message (Received, Authentication-Results, DKIM-Signature…), CRLF-terminated */
  prepend: string | Buffer;
  /** the message as received (line endings normalised) */
  chunks: readonly Buffer[];
  messageId?: string | undefined;
  /** give up (451) when storing and publishing take longer than this; default 30 s */
  timeoutMs?: number;
  /**
   * Aborted when the client has been told this attempt failed (the edge's 421 at the shutdown
   * deadline or the session limit): from then on the message is never queued. An `SmtpError`
   * reason is what this throws.
   */
  signal?: AbortSignal;
}

/**
 * Bodies up to this size travel inside their spool message (one JetStream write for the whole
 * message); larger ones go to the Object Store first (NATS payloads are 1 MiB at most).
 */
export const ATTACH_MAX = 512 * 1024;

export interface Accepted {
  queueId: string;
  body: AttachedBody | ObjectBodyRef;
  /** the SMTP reply to send: `250 2.0.0 OK: queued as <queueId>` */
  reply: ReturnType<typeof replies.accepted>;
}

class AcceptTimeout extends Error {
  override name = "AcceptTimeout";
}

class AcceptAbandoned extends Error {
  override name = "AcceptAbandoned";
}

/** Settles with `work`, or rejects when `abandoned` is aborted (which `ms` later does). */
function within<T>(ms: number, work: Promise<T>, abandoned: AbortController): Promise<T> {
  const timer = setTimeout(
    () => abandoned.abort(new AcceptTimeout(`not stored and published within ${ms} ms`)),
    ms,
  );
  let onAbort: () => void = () => {};
  const stop = new Promise<never>((_, reject) => {
    onAbort = () => reject(abandoned.signal.reason);
    if (abandoned.signal.aborted) onAbort();
    else abandoned.signal.addEventListener("abort", onAbort, { once: true });
  });
  return Promise.race([work, stop]).finally(() => {
    clearTimeout(timer);
    abandoned.signal.removeEventListener("abort", onAbort);
  });
}

/**
 * Durable acceptance (docs/architecture.md, durability rule 1), the one way mx and msa take responsibility for a
 * message: `QueuedMail` is published to the spool (`mail.v1.spool`, `Nats-Msg-Id = queueId`) with
 * the body (prepended headers + message) as its attachment, in one JetStream write; a body over
 * ATTACH_MAX goes into the Object Store under the queue ID first. The `received` and `queued`
 * events are emitted, and only then does this resolve. Any failure (NATS down, a timeout,
 * a store error) is logged with its cause and thrown as `SmtpError(451 4.3.0)`: the client keeps
 * the message and tries again, and we never answer 250 for something we could lose.
 * Once the client has been told the attempt failed (our timeout, or `signal`), the work that is
 * still running does not publish, and deletes the body it stored: the client's retry must not
 * become a second copy. (A publish already on its way when that happens cannot be called back.)
 */
/** how long acceptance waits for a lost NATS connection to come back before answering 451 */
const RECONNECT_WAIT_MS = 3000;
/** how long the spool publish may take, retries included (a stream leader election takes seconds) */
const PUBLISH_TIMEOUT_MS = 10_000;

export async function acceptMessage(input: AcceptInput): Promise<Accepted> {
  const { bus, telemetry, queueId, envelope } = input;
  const { log, tracer } = telemetry;
  const prepend = typeof input.prepend === "string" ? Buffer.from(input.prepend) : input.prepend;
  const recipients = envelope.rcptTo.map((r) => r.address);
  const abandoned = new AbortController();
  const caller = input.signal;
  const onCallerAbort = () => abandoned.abort(caller?.reason);
  if (caller?.aborted) onCallerAbort();
  else caller?.addEventListener("abort", onCallerAbort, { once: true });
  try {
    // a client whose NATS node went away reconnects to another within about a second
    if (!(await bus.connectedWithin(RECONNECT_WAIT_MS))) throw new Error("not connected to NATS");
    const work = (async () => {
      if (abandoned.signal.aborted) throw new AcceptAbandoned("abandoned before it was stored");
      const parts = [prepend, ...input.chunks];
      const size = parts.reduce((n, b) => n + b.length, 0);
      let body: AttachedBody | ObjectBodyRef;
      if (size <= ATTACH_MAX) {
        const hash = createHash("sha256");
        for (const p of parts) hash.update(p);
        body = { attached: true, size, sha256: hash.digest("hex") };
      } else {
        const store = await bus.bodies();
        body = await inSpan(
          tracer,
          "body.store",
          { kind: SpanKind.CLIENT, attributes: { [attr.queueId]: queueId } },
          async (span) => {
            const ref = await store.put(queueId, parts);
            span.setAttribute(attr.size, ref.size);
            return ref;
          },
        );
        // the last moment to honour a failure reply the client already has: nothing awaits from
        // here to the publish
        if (abandoned.signal.aborted) {
          await store
            .delete(queueId)
            .catch((err: unknown) =>
              log.warn(
                { queueId, err: err instanceof Error ? err.message : String(err) },
                "could not delete the body of an abandoned message (BODY_TTL will)",
              ),
            );
          throw new AcceptAbandoned("abandoned after it was stored; not queued");
        }
      }
      bus.emit({
        type: "received",
        queueId,
        mailFrom: envelope.mailFrom,
        recipients,
        size,
        ...(input.messageId ? { messageId: input.messageId } : {}),
        ...(input.client ? { client: { ip: input.client.ip, helo: input.client.helo } } : {}),
      });
      // one JetStream write holds the envelope and (when it fits) the body: durable together
      await bus.publish(
        subjects.queued(),
        QueuedMail,
        {
          v: 1,
          queueId,
          source: input.source,
          receivedAt: new Date().toISOString(),
          envelope,
          body,
          ...(input.client ? { client: input.client } : {}),
          ...(input.messageId ? { messageId: input.messageId } : {}),
        },
        {
          msgId: queueId,
          ...("attached" in body ? { attachment: parts } : {}),
          // retried while a stream leader moves (seconds); NATS gone for longer is a 451
          timeoutMs: Math.min(input.timeoutMs ?? 30_000, PUBLISH_TIMEOUT_MS),
          signal: abandoned.signal,
        },
      );
      return body;
    })();
    // a late failure of abandoned work must not become an unhandled rejection
    work.catch(() => {});
    const body = await within(input.timeoutMs ?? 30_000, work, abandoned);
    bus.emit({ type: "queued", queueId, recipients, size: body.size });
    bus.index(queueId, { messageId: input.messageId, addresses: [envelope.mailFrom, ...recipients] });
    return { queueId, body, reply: replies.accepted(queueId) };
  } catch (err) {
    if (caller?.aborted && caller.reason instanceof SmtpError) {
      log.warn(
        { queueId, reply: caller.reason.reply.code },
        "the client was told the message failed before it was queued; it will not be",
      );
      throw caller.reason;
    }
    log.error(
      { queueId, err: err instanceof Error ? err.message : String(err) },
      "could not store and queue the message; answering 451 4.3.0",
    );
    throw new SmtpError(replies.localError(), { cause: err });
  } finally {
    caller?.removeEventListener("abort", onCallerAbort);
  }
}
