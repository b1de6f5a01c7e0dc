import {
  type ConsumerKey,
  ContractError,
  decode,
  decodeJson,
  MailEvent,
  type StreamKey,
  subjects,
  topology,
  trackHash,
} from "@mailpipe/contracts";
import { attr, contextWithQueueId, currentTraceId, redactUrls, type Telemetry } from "@mailpipe/telemetry";
import {
  type ConsumerMessages,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
  jetstream,
  jetstreamManager,
  type PubAck,
} from "@nats-io/jetstream";
import { connect, type MsgHdrs, type NatsConnection, headers as natsHeaders } from "@nats-io/transport-node";
import { context, propagation, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import type { z } from "zod";
import { BodyStore } from "./body-store.ts";
import { BusConnectError, BusError, describeConnectError } from "./errors.ts";
import { ATTACHMENT_OFFSET, natsHeaderGetter, natsHeaderSetter, splitPayload } from "./headers.ts";
import { JsPublisher, NoStreamError, PublishTimeoutError } from "./js-publisher.ts";
import {
  defaultTopologySettings,
  ensureConsumer,
  ensureStream,
  type TopologySettings,
  whileUnavailable,
} from "./topology.ts";

export interface BusOptions {
  /** comma-separated list of nats:// URLs (credentials may be in the URL) */
  url: string;
  /** connection name shown by the server, e.g. the service name */
  name: string;
  telemetry: Telemetry;
  topology?: Partial<TopologySettings>;
  /** how long a JetStream publish waits for its ack */
  publishTimeoutMs?: number;
  /** keep retrying the first connection instead of failing (services do; CLIs do not) */
  waitOnFirstConnect?: boolean;
}

/** What a handler decides for a message. Returning nothing means ack. */
export type Outcome =
  | { kind: "ack" }
  | { kind: "retry"; delayMs: number; reason?: string }
  | { kind: "term"; reason: string };

export const outcome = {
  ack: (): Outcome => ({ kind: "ack" }),
  /** nak with a delay: JetStream redelivers after it */
  retry: (delayMs: number, reason?: string): Outcome => ({
    kind: "retry",
    delayMs,
    ...(reason ? { reason } : {}),
  }),
  /** never redeliver */
  term: (reason: string): Outcome => ({ kind: "term", reason }),
};

export interface HandlerContext {
  subject: string;
  headers: MsgHdrs | undefined;
  /** 1 on first delivery */
  deliveryCount: number;
  /** the stream and sequence the message is stored at */
  stream: string;
  seq: number;
  /** the bytes published with the message (`PublishOptions.attachment`), as a view of the payload */
  attachment: Buffer | undefined;
  /** tells JetStream the work is still going (resets the ack wait) */
  working(): void;
}

export type Handler<T> = (message: T, ctx: HandlerContext) => Promise<Outcome | void> | Outcome | void;

export interface ConsumeOptions {
  /** at most this many handlers run at once in this process */
  maxInFlight?: number;
  /** JetStream ack wait; unacked messages come back after it */
  ackWaitMs?: number;
  /** total unacked across all replicas sharing the durable */
  maxAckPending?: number;
  /** keep calling working() while a handler runs, up to this long (0 = never) */
  heartbeatForMs?: number;
  /** delay before redelivering after a handler threw, grows with the delivery count */
  errorBackoffMs?: number;
}

export interface Subscription {
  readonly inFlight: number;
  /** stop taking messages and wait for the handlers in flight */
  stop(): Promise<void>;
}

export interface PublishOptions {
  /** Nats-Msg-Id: a repeat within the duplicate window is stored once */
  msgId: string;
  headers?: Record<string, string>;
  timeoutMs?: number;
  /** bytes that travel after the JSON in the same payload (a small message body) */
  attachment?: Uint8Array | readonly Uint8Array[];
  /** stops retrying once aborted (the caller gave up: nothing may be published after that) */
  signal?: AbortSignal;
}

/** a publish that got no answer is sent again after this long (same Nats-Msg-Id: stored once) */
const PUBLISH_ATTEMPT_MS = 2000;
/** pause before sending again after "no stream answers" or "temporarily unavailable" */
const PUBLISH_RETRY_DELAY_MS = 200;
/** JetStream's "JetStream system temporarily unavailable" (no leader for the stream yet) */
const JS_TEMPORARILY_UNAVAILABLE = 10008;

/**
 * While a stream's leader moves (its node died) a publish gets no answer, "no responders" (503)
 * or "temporarily unavailable"; while the client reconnects to another node it waits in the
 * client's buffer. All of these pass within seconds, and the same Nats-Msg-Id makes a repeat
 * store the message once, so these are sent again until the publish's time is up.
 */
function retryable(err: unknown): boolean {
  return (
    err instanceof NoStreamError ||
    err instanceof PublishTimeoutError ||
    (err instanceof JetStreamApiError && err.code === JS_TEMPORARILY_UNAVAILABLE)
  );
}

/** The one way services talk to each other: validated messages over JetStream, bodies in the Object Store. */
export class Bus {
  readonly nc: NatsConnection;
  readonly js: JetStreamClient;
  readonly jsm: JetStreamManager;
  readonly settings: TopologySettings;
  readonly #telemetry: Telemetry;
  readonly #publishTimeoutMs: number;
  readonly #subs = new Set<Subscription>();
  /** consumers bound in this process, for the lag gauges */
  readonly #consumers = new Map<
    string,
    { info(): Promise<{ num_pending: number; num_ack_pending: number }> }
  >();
  #bodies: BodyStore | undefined;
  #connected = true;
  readonly #publisher: JsPublisher;

  private constructor(nc: NatsConnection, jsm: JetStreamManager, opts: BusOptions) {
    this.nc = nc;
    this.jsm = jsm;
    this.js = jetstream(nc, { timeout: opts.publishTimeoutMs ?? 5000 });
    this.settings = { ...defaultTopologySettings, ...opts.topology };
    this.#telemetry = opts.telemetry;
    this.#publishTimeoutMs = opts.publishTimeoutMs ?? 5000;
    this.#publisher = new JsPublisher(nc);
    void this.#watchStatus();
  }

  static async connect(opts: BusOptions): Promise<Bus> {
    let nc: NatsConnection;
    try {
      nc = await connect({
        servers: opts.url.split(",").map((s) => s.trim()),
        name: opts.name,
        maxReconnectAttempts: -1,
        reconnectTimeWait: 500,
        waitOnFirstConnect: opts.waitOnFirstConnect ?? false,
        timeout: 5000,
        // nats.js builds two Error objects with stack traces per request to explain a later
        // timeout; at thousands of publishes a second that was ~7% of every service's CPU
        noAsyncTraces: true,
      });
    } catch (err) {
      throw new BusConnectError(describeConnectError(opts.url, err), { cause: err });
    }
    let jsm: JetStreamManager;
    try {
      jsm = await jetstreamManager(nc, { timeout: opts.publishTimeoutMs ?? 5000 });
    } catch (err) {
      await nc.close();
      throw new BusConnectError(
        `NATS at ${redactUrls(opts.url)} has no JetStream (${(err as Error).message}): start nats-server with -js`,
        { cause: err },
      );
    }
    return new Bus(nc, jsm, opts);
  }

  get connected(): boolean {
    return this.#connected && !this.nc.isClosed();
  }

  readonly #reconnected = new Set<() => void>();

  /**
   * Resolves true once connected (at once if it is), false after `timeoutMs`: a client whose
   * node went away reconnects to another one of the cluster within about a second.
   */
  async connectedWithin(timeoutMs: number): Promise<boolean> {
    if (this.connected) return true;
    if (this.nc.isClosed()) return false;
    let done!: () => void;
    const reconnected = new Promise<void>((resolve) => {
      done = resolve;
    });
    this.#reconnected.add(done);
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([reconnected, new Promise((r) => (timer = setTimeout(r, timeoutMs)))]);
    } finally {
      clearTimeout(timer);
      this.#reconnected.delete(done);
    }
    return this.connected;
  }

  async #watchStatus(): Promise<void> {
    const log = this.#telemetry.log;
    for await (const s of this.nc.status()) {
      if (s.type === "disconnect") {
        this.#connected = false;
        log.warn({ server: s.server }, "lost the NATS connection; reconnecting");
      } else if (s.type === "reconnect") {
        this.#connected = true;
        for (const wake of this.#reconnected) wake();
        log.info({ server: s.server }, "reconnected to NATS");
      } else if (s.type === "error") {
        log.error({ err: s.error }, "NATS connection error");
      }
    }
  }

  /** Creates or updates the streams and the body bucket (idempotent; every service runs it at start). */
  async ensureTopology(streams: StreamKey[] = Object.keys(topology.streams) as StreamKey[]): Promise<void> {
    for (const key of streams) {
      for (const note of await ensureStream(this.jsm, key, this.settings)) this.#telemetry.log.warn(note);
    }
    await this.bodies();
  }

  /** Whether a stream exists (e.g. one kept only for an upgrade). */
  async streamExists(name: string): Promise<boolean> {
    try {
      await this.jsm.streams.info(name);
      return true;
    } catch (err) {
      if (err instanceof JetStreamApiError && err.code === 10059) return false;
      throw err;
    }
  }

  async bodies(): Promise<BodyStore> {
    this.#bodies ??= await whileUnavailable(() =>
      BodyStore.open(this.js, this.jsm, topology.bodyBucket, {
        ttlMs: this.settings.bodyTtlMs,
        replicas: this.settings.replicas,
        warn: (note) => this.#telemetry.log.warn(note),
      }),
    );
    return this.#bodies;
  }

  /**
   * Validates `message` against `schema`, publishes it with a PRODUCER span whose context travels
   * in the headers (W3C traceparent), and resolves once JetStream has stored it.
   */
  async publish<S extends z.ZodType>(
    subject: string,
    schema: S,
    message: z.input<S>,
    opts: PublishOptions,
  ): Promise<PubAck> {
    const value = decode(schema, message, `message for ${subject}`);
    const tracer = this.#telemetry.tracer;
    const span = tracer.startSpan(`send ${subject}`, {
      kind: SpanKind.PRODUCER,
      attributes: {
        [attr.messagingSystem]: "nats",
        [attr.messagingDestination]: subject,
        [attr.messagingOperationType]: "send",
        [attr.messagingMessageId]: opts.msgId,
        ...(typeof (value as { queueId?: unknown }).queueId === "string"
          ? { [attr.queueId]: (value as { queueId: string }).queueId }
          : {}),
      },
    });
    const h = natsHeaders();
    for (const [k, v] of Object.entries(opts.headers ?? {})) h.set(k, v);
    propagation.inject(trace.setSpan(context.active(), span), h, natsHeaderSetter);
    let payload: string | Uint8Array = JSON.stringify(value);
    if (opts.attachment) {
      const json = Buffer.from(payload);
      const parts = opts.attachment instanceof Uint8Array ? [opts.attachment] : opts.attachment;
      h.set(ATTACHMENT_OFFSET, String(json.byteLength));
      payload = Buffer.concat([json, ...parts]);
    }
    try {
      h.set("Nats-Msg-Id", opts.msgId);
      const deadline = performance.now() + (opts.timeoutMs ?? this.#publishTimeoutMs);
      let ack: PubAck;
      for (let attempt = 1; ; attempt++) {
        const left = deadline - performance.now();
        try {
          ack = await this.#publisher.publish(subject, payload, h, Math.min(left, PUBLISH_ATTEMPT_MS));
          break;
        } catch (err) {
          const wait = err instanceof PublishTimeoutError ? 0 : PUBLISH_RETRY_DELAY_MS;
          if (!retryable(err) || opts.signal?.aborted || deadline - performance.now() <= wait + 50) throw err;
          span.setAttribute("messaging.nats.publish_attempts", attempt + 1);
          if (wait) await new Promise((r) => setTimeout(r, wait));
          if (opts.signal?.aborted) throw err;
        }
      }
      if (ack.duplicate) span.setAttribute("messaging.nats.duplicate", true);
      return ack;
    } catch (err) {
      span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message });
      throw new BusError(`publishing to ${subject} failed: ${(err as Error).message}`, { cause: err });
    } finally {
      span.end();
    }
  }

  /**
   * Publishes an event to the events stream without waiting for an ack: events are for tracking
   * and metrics, and must never slow down or fail the mail path.
   */
  emit(
    event: Omit<MailEvent, "v" | "at" | "service" | "traceId"> & Partial<Pick<MailEvent, "at" | "traceId">>,
  ): void {
    try {
      const traceId = event.traceId ?? currentTraceId();
      const full = decode(
        MailEvent,
        {
          v: 1,
          at: new Date().toISOString(),
          service: this.#telemetry.service,
          ...(traceId ? { traceId } : {}),
          ...event,
        },
        "event",
      );
      this.nc.publish(subjects.event(full.type, full.queueId), JSON.stringify(full));
    } catch (err) {
      this.#telemetry.log.warn({ err, event: event.type }, "could not emit event");
    }
  }

  /**
   * Adds a message to the tracking index (`mailctl track <Message-ID | address>`): one small message
   * per key in MAIL_EVENTS, published like events (no ack awaited; tracking never slows the mail).
   */
  index(queueId: string, keys: { messageId?: string | undefined; addresses?: readonly string[] }): void {
    try {
      if (keys.messageId) {
        this.nc.publish(
          subjects.trackIndex("mid", keys.messageId),
          `${trackHash("mid", keys.messageId)} ${queueId}`,
        );
      }
      const seen = new Set<string>();
      for (const a of keys.addresses ?? []) {
        const k = a.toLowerCase();
        if (k === "" || seen.has(k)) continue;
        seen.add(k);
        this.nc.publish(subjects.trackIndex("addr", k), `${trackHash("addr", k)} ${queueId}`);
      }
    } catch (err) {
      this.#telemetry.log.warn({ err, queueId }, "could not index a message for tracking");
    }
  }

  /**
   * Binds the durable consumer `key` (created if missing) and runs `handler` for each message:
   * validates it (an invalid one is logged and terminated), continues the publisher's trace in a
   * CONSUMER span, and maps the handler's outcome to ack / nak(delay) / term. A handler that
   * throws gets its message again after a growing delay.
   */
  async consume<S extends z.ZodType>(
    key: ConsumerKey,
    schema: S,
    handler: Handler<z.infer<S>>,
    opts: ConsumeOptions = {},
  ): Promise<Subscription> {
    const maxInFlight = opts.maxInFlight ?? 64;
    const ackWaitMs = opts.ackWaitMs ?? 30_000;
    const heartbeatForMs = opts.heartbeatForMs ?? 15 * 60_000;
    const errorBackoffMs = opts.errorBackoffMs ?? 1000;
    const { stream, durable } = await ensureConsumer(this.jsm, key, {
      ackWaitMs,
      maxAckPending: opts.maxAckPending ?? Math.max(1000, maxInFlight * 16),
      replicas: this.settings.replicas,
    });
    const consumer = await whileUnavailable(() => this.js.consumers.get(stream, durable));
    this.#consumers.set(durable, consumer);
    this.#lagGauges();
    // Pull only as many messages as there are free slots: a message waiting in a client-side
    // buffer gets no working() heartbeat, and after its ack wait JetStream would hand it to another
    // replica while this one still means to run it (the same mail sent twice).
    const expires = Math.max(1000, Math.min(30_000, ackWaitMs));
    const minPull = Math.max(1, Math.floor(maxInFlight / 8));
    let current: ConsumerMessages | undefined;
    const { log, tracer, metrics } = this.#telemetry;
    const handled = metrics.counter(
      "bus_messages_handled_total",
      "Bus messages handled, by consumer and outcome",
      ["consumer", "outcome"],
    );
    const duration = metrics.histogram("bus_handler_seconds", "Time handlers took, by consumer", [
      "consumer",
    ]);

    let inFlight = 0;
    let stopping = false;
    let wake: (() => void) | undefined;
    const idle = new Set<() => void>();
    const slotFree = () =>
      new Promise<void>((resolve) => {
        wake = resolve;
      });

    // fields a newer version wrote (a rolling upgrade): dropped, and said once per set of fields
    const unknownSeen = new Set<string>();
    const onUnknownFields = (fields: string[]) => {
      const key = fields.join(",");
      if (unknownSeen.has(key) || unknownSeen.size >= 100) return;
      unknownSeen.add(key);
      log.warn(
        { consumer: durable, fields },
        "a message has fields this version does not know (written by a newer version?): they are ignored; " +
          "finish upgrading this service",
      );
    };

    const run = async (m: JsMsg): Promise<void> => {
      const started = performance.now();
      const parent = propagation.extract(ROOT_CONTEXT, m.headers, natsHeaderGetter);
      let message: z.infer<S>;
      let attachment: Buffer | undefined;
      try {
        const parts = splitPayload(m.data, m.headers);
        attachment = parts.attachment;
        message = decodeJson(schema, parts.json, `message on ${m.subject}`, { onUnknownFields });
      } catch (err) {
        log.error(
          {
            err: err instanceof ContractError || err instanceof RangeError ? err.message : err,
            subject: m.subject,
            consumer: durable,
          },
          "dropping a message that does not match its contract",
        );
        m.term();
        handled.inc({ consumer: durable, outcome: "invalid" });
        return;
      }
      const queueId = (message as { queueId?: unknown }).queueId;
      const ctx = typeof queueId === "string" ? contextWithQueueId(parent, queueId) : parent;
      await context.with(ctx, () =>
        tracer.startActiveSpan(
          `process ${m.subject}`,
          {
            kind: SpanKind.CONSUMER,
            attributes: {
              [attr.messagingSystem]: "nats",
              [attr.messagingDestination]: m.subject,
              [attr.messagingOperationType]: "process",
              [attr.messagingConsumerGroup]: durable,
              [attr.messagingDeliveryCount]: m.info.deliveryCount,
              ...(typeof queueId === "string" ? { [attr.queueId]: queueId } : {}),
            },
          },
          async (span) => {
            const beat =
              heartbeatForMs > 0
                ? setInterval(
                    () => {
                      if (performance.now() - started < heartbeatForMs) m.working();
                    },
                    Math.max(250, ackWaitMs / 3),
                  )
                : undefined;
            let result: Outcome;
            try {
              result =
                (await handler(message, {
                  subject: m.subject,
                  headers: m.headers,
                  deliveryCount: m.info.deliveryCount,
                  stream: m.info.stream,
                  seq: m.seq,
                  attachment,
                  working: () => m.working(),
                })) ?? outcome.ack();
            } catch (err) {
              const delayMs = Math.min(
                errorBackoffMs * 2 ** Math.min(m.info.deliveryCount - 1, 8),
                5 * 60_000,
              );
              log.error(
                { err, subject: m.subject, deliveryCount: m.info.deliveryCount, retryInMs: delayMs },
                "handler failed; will retry",
              );
              span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error)?.message });
              result = outcome.retry(delayMs, "handler error");
            } finally {
              if (beat) clearInterval(beat);
            }
            span.setAttribute("messaging.nats.outcome", result.kind);
            if (result.kind === "ack") m.ack();
            else if (result.kind === "retry") m.nak(result.delayMs);
            else {
              log.warn({ subject: m.subject, reason: result.reason }, "message terminated");
              // no reason argument: servers before 2.11 ignore term with a reason
              m.term();
            }
            handled.inc({ consumer: durable, outcome: result.kind });
            duration.observe({ consumer: durable }, (performance.now() - started) / 1000);
            span.end();
          },
        ),
      );
    };

    const start = (m: JsMsg) => {
      inFlight++;
      void run(m)
        .catch((err) => log.error({ err }, "unexpected error in message handling"))
        .finally(() => {
          inFlight--;
          wake?.();
          if (inFlight === 0) for (const f of idle) f();
        });
    };

    const loop = (async () => {
      let failures = 0;
      while (!stopping) {
        // wait for a few free slots rather than pulling one message at a time under load
        while (!stopping && maxInFlight - inFlight < minPull && inFlight > 0) {
          await slotFree();
        }
        if (stopping) break;
        const free = maxInFlight - inFlight;
        try {
          current = await consumer.fetch({ max_messages: free, expires });
          for await (const m of current) {
            if (stopping) {
              m.nak(); // this process is leaving: another replica takes it at once
              continue;
            }
            start(m);
          }
          failures = 0;
        } catch (err) {
          if (stopping) break;
          failures++;
          const delay = Math.min(250 * 2 ** Math.min(failures, 5), 5000);
          log.warn(
            { err: (err as Error).message, consumer: durable, retryInMs: delay },
            "pulling messages failed; retrying",
          );
          await new Promise((r) => setTimeout(r, delay));
        } finally {
          current = undefined;
        }
      }
    })();

    const sub: Subscription = {
      get inFlight() {
        return inFlight;
      },
      stop: async () => {
        if (stopping) return;
        stopping = true;
        await current?.close().catch(() => {});
        wake?.();
        await loop.catch(() => {});
        if (inFlight > 0) await new Promise<void>((resolve) => idle.add(resolve));
        this.#subs.delete(sub);
      },
    };
    this.#subs.add(sub);
    return sub;
  }

  #lagRegistered = false;

  /** Consumer lag, read from JetStream when Prometheus scrapes (one info request per consumer). */
  #lagGauges(): void {
    if (this.#lagRegistered) return;
    this.#lagRegistered = true;
    const { metrics, log } = this.#telemetry;
    const consumers = this.#consumers;
    let snapshot: Promise<Map<string, { num_pending: number; num_ack_pending: number }>> | undefined;
    const read = () => {
      snapshot ??= (async () => {
        const out = new Map<string, { num_pending: number; num_ack_pending: number }>();
        for (const [name, c] of consumers) {
          try {
            out.set(name, await c.info());
          } catch (err) {
            log.debug(
              { err: (err as Error).message, consumer: name },
              "could not read consumer info for metrics",
            );
          }
        }
        setTimeout(() => {
          snapshot = undefined;
        }, 100).unref();
        return out;
      })();
      return snapshot;
    };
    metrics.gauge(
      "bus_consumer_pending",
      "Messages in the stream not yet delivered to this consumer (lag)",
      ["consumer"],
      async function () {
        for (const [name, info] of await read()) this.set({ consumer: name }, info.num_pending);
      },
    );
    metrics.gauge(
      "bus_consumer_ack_pending",
      "Messages delivered to this consumer and not yet acked",
      ["consumer"],
      async function () {
        for (const [name, info] of await read()) this.set({ consumer: name }, info.num_ack_pending);
      },
    );
  }

  /** Stops consumers (waiting for their handlers), then drains and closes the connection. */
  async close(): Promise<void> {
    await Promise.all([...this.#subs].map((s) => s.stop()));
    this.#publisher.close();
    if (!this.nc.isClosed()) await this.nc.drain().catch(() => this.nc.close());
  }
}
