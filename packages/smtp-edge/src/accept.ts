import type { Bus } from "@mailpipe/bus";
import { type BodyRef, type Envelope, QueuedMail, replies, SmtpError, subjects } from "@mailpipe/contracts";
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
}

export interface Accepted {
  queueId: string;
  body: BodyRef;
  /** the SMTP reply to send: `250 2.0.0 OK: queued as <queueId>` */
  reply: ReturnType<typeof replies.accepted>;
}

class AcceptTimeout extends Error {
  override name = "AcceptTimeout";
}

function within<T>(ms: number, work: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new AcceptTimeout(`not stored and published within ${ms} ms`)), ms);
  });
  return Promise.race([work, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Durable acceptance (DESIGN.md §3 rule 1), the one way mx and msa take responsibility for a
 * message: the body (prepended headers + message) goes into the body store under the queue ID,
 * `QueuedMail` is published on `mail.v1.queued` with `Nats-Msg-Id = queueId`, the `received` and
 * `queued` events are emitted, and only then does this resolve. Any failure (NATS down, a timeout,
 * a store error) is logged with its cause and thrown as `SmtpError(451 4.3.0)`: the client keeps
 * the message and tries again, and we never answer 250 for something we could lose.
 */
export async function acceptMessage(input: AcceptInput): Promise<Accepted> {
  const { bus, telemetry, queueId, envelope } = input;
  const { log, tracer } = telemetry;
  const prepend = typeof input.prepend === "string" ? Buffer.from(input.prepend) : input.prepend;
  const recipients = envelope.rcptTo.map((r) => r.address);
  try {
    if (!bus.connected) throw new Error("not connected to NATS");
    const work = (async () => {
      const store = await bus.bodies();
      const body = await inSpan(
        tracer,
        "body.store",
        { kind: SpanKind.CLIENT, attributes: { [attr.queueId]: queueId } },
        async (span) => {
          const ref = await store.put(queueId, [prepend, ...input.chunks]);
          span.setAttribute(attr.size, ref.size);
          return ref;
        },
      );
      bus.emit({
        type: "received",
        queueId,
        mailFrom: envelope.mailFrom,
        recipients,
        size: body.size,
        ...(input.messageId ? { messageId: input.messageId } : {}),
        ...(input.client ? { client: { ip: input.client.ip, helo: input.client.helo } } : {}),
      });
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
        { msgId: queueId },
      );
      return body;
    })();
    // a late failure of abandoned work must not become an unhandled rejection
    work.catch(() => {});
    const body = await within(input.timeoutMs ?? 30_000, work);
    bus.emit({ type: "queued", queueId, recipients, size: body.size });
    return { queueId, body, reply: replies.accepted(queueId) };
  } catch (err) {
    log.error(
      { queueId, err: err instanceof Error ? err.message : String(err) },
      "could not store and queue the message; answering 451 4.3.0",
    );
    throw new SmtpError(replies.localError(), { cause: err });
  }
}
