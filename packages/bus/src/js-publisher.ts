// JetStream publishes with their acks matched on one inbox subscription. nats.js's js.publish goes
// through nc.request, which per publish makes a request object, a timer, a deferred, and (when the
// ack resolves it) an Error object it never throws: at thousands of publishes a second across the
// services that was a few percent of their CPU. This does the same protocol (publish with a reply
// subject; the stream answers with a PubAck or an API error; no stream answers 503 "no responders")
// with a token per publish and one timer for all timeouts.
import { JetStreamApiError, type PubAck } from "@nats-io/jetstream";
import { type MsgHdrs, type NatsConnection, nuid, type Subscription } from "@nats-io/transport-node";

interface Pending {
  resolve(ack: PubAck): void;
  reject(err: Error): void;
  deadline: number;
}

/** The publish timed out: JetStream may or may not have stored the message. */
export class PublishTimeoutError extends Error {
  override name = "PublishTimeoutError";
}

/** No stream takes the subject (JetStream off, or the stream missing). */
export class NoStreamError extends Error {
  override name = "NoStreamError";
}

const SWEEP_MS = 100;

export class JsPublisher {
  readonly #nc: NatsConnection;
  readonly #prefix: string;
  readonly #pending = new Map<string, Pending>();
  readonly #sub: Subscription;
  #next = 0;
  #sweeper: NodeJS.Timeout | undefined;

  constructor(nc: NatsConnection) {
    this.#nc = nc;
    this.#prefix = `_INBOX.${nuid.next()}.`;
    this.#sub = nc.subscribe(`${this.#prefix}*`, {
      callback: (err, m) => {
        if (err) return;
        const p = this.#pending.get(m.subject.slice(this.#prefix.length));
        if (!p) return; // timed out already
        this.#pending.delete(m.subject.slice(this.#prefix.length));
        if (m.headers?.code === 503) {
          p.reject(new NoStreamError("no JetStream stream takes this subject (is JetStream on?)"));
          return;
        }
        try {
          const ack = JSON.parse(new TextDecoder().decode(m.data)) as PubAck & {
            error?: { code: number; err_code: number; description: string };
          };
          if (ack.error) p.reject(new JetStreamApiError(ack.error));
          else
            p.resolve({
              stream: ack.stream,
              seq: ack.seq,
              duplicate: ack.duplicate ?? false,
              domain: ack.domain,
            });
        } catch (e) {
          p.reject(new Error(`unreadable JetStream ack: ${(e as Error).message}`));
        }
      },
    });
  }

  /** Publishes `payload` and resolves with JetStream's ack; rejects on an API error or a timeout. */
  publish(
    subject: string,
    payload: Uint8Array | string,
    headers: MsgHdrs,
    timeoutMs: number,
  ): Promise<PubAck> {
    const token = (this.#next++).toString(36);
    return new Promise<PubAck>((resolve, reject) => {
      this.#pending.set(token, { resolve, reject, deadline: performance.now() + timeoutMs });
      this.#sweeper ??= setInterval(() => this.#sweep(), SWEEP_MS);
      try {
        this.#nc.publish(subject, payload, { reply: `${this.#prefix}${token}`, headers });
      } catch (err) {
        this.#pending.delete(token);
        reject(err as Error);
      }
    });
  }

  #sweep(): void {
    const now = performance.now();
    for (const [token, p] of this.#pending) {
      if (p.deadline <= now) {
        this.#pending.delete(token);
        p.reject(new PublishTimeoutError("JetStream did not acknowledge the publish in time"));
      }
    }
    if (this.#pending.size === 0 && this.#sweeper) {
      clearInterval(this.#sweeper);
      this.#sweeper = undefined;
    }
  }

  /** Fails what is still waiting (the connection is closing). */
  close(): void {
    if (this.#sweeper) clearInterval(this.#sweeper);
    this.#sweeper = undefined;
    for (const p of this.#pending.values()) p.reject(new Error("the NATS connection is closing"));
    this.#pending.clear();
    this.#sub.unsubscribe();
  }
}
