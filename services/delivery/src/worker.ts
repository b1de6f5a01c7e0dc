import { readFileSync } from "node:fs";
import tls from "node:tls";
import type { BodyStore, Bus, HandlerContext, Outcome } from "@mailpipe/bus";
import { outcome } from "@mailpipe/bus";
import {
  formatReply,
  parseAddress,
  RecipientStatus,
  type RemoteDeliveryRequest,
  statusMsgId,
  subjects,
} from "@mailpipe/contracts";
import type { DestinationSlots } from "@mailpipe/queue";
import { attr, boundedLabel, inSpan, OTHER_LABEL, SpanKind, type Telemetry } from "@mailpipe/telemetry";
import type { Config } from "./config.ts";
import { Connector } from "./connector.ts";
import { jitter, slotKeeper } from "./destination-slot.ts";
import { type OutboundTls, staticOutboundTls } from "./outbound-tls.ts";
import type { TlsResult } from "./tls-check.ts";
import { type RecipientResult, runTransaction } from "./transaction.ts";

/** Node's root CAs plus the operator's (OUTBOUND_TLS_CA_FILE); undefined: Node's alone. */
export function trustedCas(file: string): string[] | undefined {
  if (!file) return undefined;
  let pem: string;
  try {
    pem = readFileSync(file, "utf8");
  } catch (err) {
    throw new Error(
      `OUTBOUND_TLS_CA_FILE: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}): point it at a PEM file of CA certificates, or leave it empty`,
    );
  }
  if (!pem.includes("-----BEGIN CERTIFICATE-----")) {
    throw new Error(`OUTBOUND_TLS_CA_FILE: ${file} holds no PEM certificate`);
  }
  return [...tls.rootCertificates, pem];
}

/** The delivery event's `tls`: the policy and what the session negotiated. */
function tlsEvent(t: TlsResult) {
  return {
    policy: t.policy,
    source: t.source,
    ...(t.version ? { version: t.version } : {}),
    ...(t.cipher ? { cipher: t.cipher } : {}),
    ...(t.verified !== undefined ? { verified: t.verified } : {}),
  };
}

/** Header on every status this service publishes: which worker (MAIL_HOSTNAME/pid) made it. */
export const WORKER_HEADER = "Mailpipe-Worker";

/** Results whose statuses could not be published, kept for the redelivery (bounded). */
const UNREPORTED_MAX = 10_000;
const UNREPORTED_TTL_MS = 60 * 60_000;
const PUBLISH_PAUSES_MS = [250, 1000];

export interface WorkerDeps {
  config: Pick<
    Config,
    | "MAIL_HOSTNAME"
    | "SMTP_REMOTE_PORT"
    | "DELIVERY_CONCURRENCY"
    | "DESTINATION_BUSY_DELAY"
    | "SMTP_CONNECT_TIMEOUT"
    | "SMTP_GREETING_TIMEOUT"
    | "SMTP_COMMAND_TIMEOUT"
    | "SMTP_DATA_INIT_TIMEOUT"
    | "SMTP_DATA_BLOCK_TIMEOUT"
    | "SMTP_DATA_DONE_TIMEOUT"
    | "SMTP_TLS_VERIFY"
    | "SMTP_TLS_FALLBACK_PLAIN"
    | "TLS_POLICY"
    | "OUTBOUND_TLS_CA_FILE"
    | "SMTP_REUSE_CONNECTIONS"
    | "SMTP_MAX_MESSAGES_PER_CONNECTION"
    | "SMTP_IDLE_CONNECTION_TIMEOUT"
    | "SMTP_BLOCK_LOCAL_ADDRESSES"
    | "METRICS_MAX_DESTINATIONS"
  >;
  bus: Pick<Bus, "publish" | "emit">;
  bodies: Pick<BodyStore, "read">;
  /** the cluster-wide destination slots (Redis); without them requests run with no limit check */
  slots?: Pick<DestinationSlots, "renew">;
  telemetry: Telemetry;
  /** this worker in logs and statuses; default `MAIL_HOSTNAME/pid` */
  workerId?: string;
  /** the TLS policy per destination; default TLS_POLICY and SMTP_TLS_VERIFY only */
  tls?: OutboundTls;
}

export interface DeliveryWorker {
  readonly workerId: string;
  /** the bus handler: one SMTP transaction, one status per recipient, then ack */
  handle(request: RemoteDeliveryRequest, ctx?: Pick<HandlerContext, "attachment">): Promise<Outcome | void>;
  readonly connector: Connector;
  /** QUITs the pooled sessions; call after the subscription stopped */
  close(): Promise<void>;
}

/** The label value for `destination="other"`: every destination past METRICS_MAX_DESTINATIONS. */
export const OTHER_DESTINATION = OTHER_LABEL;

export function createWorker(deps: WorkerDeps): DeliveryWorker {
  const { config, bus, bodies, telemetry } = deps;
  const workerId = deps.workerId ?? `${config.MAIL_HOSTNAME}/${process.pid}`;
  const log = telemetry.log.child({ worker: workerId });
  const { metrics, tracer } = telemetry;

  const outcomes = metrics.counter(
    "delivery_outcomes_total",
    `Recipients reported, by outcome and destination (past METRICS_MAX_DESTINATIONS destinations: "${OTHER_DESTINATION}")`,
    ["outcome", "destination"],
  );
  const destinationLabel = boundedLabel(config.METRICS_MAX_DESTINATIONS);
  const tlsDelivered = metrics.counter(
    "delivery_tls_recipients_total",
    'Recipients delivered, by the session\'s TLS: "none" (plain text), "encrypted" (certificate not verified), "verified"',
    ["tls"],
  );
  const transactionSeconds = metrics.histogram(
    "delivery_transaction_seconds",
    "Time per delivery request, every address tried included",
  );
  const connections = metrics.counter(
    "delivery_connections_total",
    "SMTP sessions used for a transaction, new or reused from the pool",
    ["reused"],
  );
  const busy = metrics.counter(
    "delivery_destination_busy_total",
    "Requests sent back to JetStream because their destination slot's lease had run out and the site was full",
  );

  const connector = new Connector({
    port: config.SMTP_REMOTE_PORT,
    heloName: config.MAIL_HOSTNAME,
    connectTimeoutMs: config.SMTP_CONNECT_TIMEOUT,
    blockLocalAddresses: config.SMTP_BLOCK_LOCAL_ADDRESSES,
    tlsFallbackPlain: config.SMTP_TLS_FALLBACK_PLAIN,
    ca: trustedCas(config.OUTBOUND_TLS_CA_FILE),
    timeouts: {
      greetingMs: config.SMTP_GREETING_TIMEOUT,
      commandMs: config.SMTP_COMMAND_TIMEOUT,
      dataInitMs: config.SMTP_DATA_INIT_TIMEOUT,
      dataBlockMs: config.SMTP_DATA_BLOCK_TIMEOUT,
      dataDoneMs: config.SMTP_DATA_DONE_TIMEOUT,
    },
    pool: {
      reuse: config.SMTP_REUSE_CONNECTIONS,
      maxMessages: config.SMTP_MAX_MESSAGES_PER_CONNECTION,
      idleMs: config.SMTP_IDLE_CONNECTION_TIMEOUT,
      // as many as can be busy at once: more would only be sockets waiting for their idle timeout
      maxIdle: config.DELIVERY_CONCURRENCY,
    },
  });
  metrics.gauge("delivery_pooled_connections", "Idle SMTP sessions kept for reuse", [], function () {
    this.set(connector.pool.idleCount);
  });
  // the router admits requests to their destination (a slot per transaction); this only keeps the slot
  const keeper = slotKeeper(deps.slots, log);
  const unreported = new Map<string, { results: RecipientResult[]; at: number }>();
  const txDeps = {
    connector,
    openBody: bodies.read.bind(bodies),
    tracer,
    log,
    connections,
    tls: deps.tls ?? staticOutboundTls({ rules: config.TLS_POLICY, verifyByDefault: config.SMTP_TLS_VERIFY }),
  };

  async function publishStatus(request: RemoteDeliveryRequest, r: RecipientResult, at: string) {
    const attempt = request.recipients.find((x) => x.address === r.address)?.attempt ?? 1;
    const status: RecipientStatus = {
      v: 1,
      queueId: request.queueId,
      dispatchId: request.dispatchId,
      recipient: r.address,
      outcome: r.outcome,
      reply: r.reply,
      attempt,
      service: "delivery",
      at,
      destination: request.destination.domain,
      ...(r.remoteMta ? { remoteMta: r.remoteMta } : {}),
      // the router releases the request's destination slot with its status
      ...(request.slot ? { slot: { site: request.slot.site, token: request.slot.token } } : {}),
      ...(r.dsnRelayed ? { dsnRelayed: true as const } : {}),
    };
    for (let i = 0; ; i++) {
      try {
        await bus.publish(subjects.status(r.outcome), RecipientStatus, status, {
          msgId: statusMsgId(request.dispatchId, r.address, r.outcome),
          headers: { [WORKER_HEADER]: workerId },
        });
        return;
      } catch (err) {
        const pause = PUBLISH_PAUSES_MS[i];
        if (pause === undefined) throw err;
        log.warn({ err: (err as Error).message, retryInMs: pause }, "status publish failed; retrying");
        await new Promise((resolve) => setTimeout(resolve, pause));
      }
    }
  }

  /** Statuses first (acked by JetStream), then events, metrics and log lines. */
  async function report(request: RemoteDeliveryRequest, results: RecipientResult[]): Promise<void> {
    const at = new Date().toISOString();
    try {
      await Promise.all(results.map((r) => publishStatus(request, r, at)));
    } catch (err) {
      // the redelivery reports these instead of running the transaction again
      if (unreported.size >= UNREPORTED_MAX) unreported.delete(unreported.keys().next().value!);
      unreported.set(request.dispatchId, { results, at: Date.now() });
      throw err;
    }
    const destination = request.destination.domain;
    for (const r of results) {
      const attempt = request.recipients.find((x) => x.address === r.address)?.attempt;
      outcomes.inc({ outcome: r.outcome, destination: destinationLabel(destination) });
      if (r.outcome === "delivered") {
        tlsDelivered.inc({ tls: !r.tls?.version ? "none" : r.tls.verified ? "verified" : "encrypted" });
      }
      bus.emit({
        type: r.outcome,
        queueId: request.queueId,
        recipient: r.address,
        destination,
        reply: r.reply,
        ...(attempt ? { attempt } : {}),
        ...(r.remoteMta ? { remoteMta: r.remoteMta } : {}),
        ...(r.tls ? { tls: tlsEvent(r.tls) } : {}),
      });
      log.info(
        {
          to: r.address,
          relay: r.remoteMta,
          outcome: r.outcome,
          reply: formatReply(r.reply),
          ...(r.tls ? { tls: tlsEvent(r.tls) } : {}),
          attempt,
          delayMs: Date.now() - Date.parse(request.receivedAt),
        },
        r.outcome,
      );
    }
  }

  async function handle(
    request: RemoteDeliveryRequest,
    hctx?: Pick<HandlerContext, "attachment">,
  ): Promise<Outcome | void> {
    const pending = unreported.get(request.dispatchId);
    if (pending) {
      unreported.delete(request.dispatchId);
      if (Date.now() - pending.at < UNREPORTED_TTL_MS) {
        log.info("reporting the results of this request's earlier transaction");
        await report(request, pending.results);
        return;
      }
    }

    const destination = request.destination.domain;
    if (!(await keeper.enter(request.slot))) {
      busy.inc();
      return outcome.retry(jitter(config.DESTINATION_BUSY_DELAY), "destination slot lost");
    }
    const held = keeper.hold(request.slot);
    let results: RecipientResult[];
    const started = performance.now();
    try {
      const attempt = Math.max(...request.recipients.map((r) => r.attempt));
      bus.emit({
        type: "attempt",
        queueId: request.queueId,
        mailFrom: request.mailFrom,
        recipients: request.recipients.map((r) => r.address),
        destination,
        attempt,
        size: request.body.size,
      });
      results = await inSpan(
        tracer,
        "smtp.deliver",
        {
          kind: SpanKind.CLIENT,
          attributes: {
            [attr.queueId]: request.queueId,
            [attr.destination]: destination,
            [attr.recipientCount]: request.recipients.length,
            [attr.attempt]: attempt,
            [attr.size]: request.body.size,
            [attr.senderDomain]: parseAddress(request.mailFrom)?.domain,
          },
        },
        async (span) => {
          const attachment = hctx?.attachment;
          const r = await runTransaction(
            request,
            attachment ? { ...txDeps, openBody: (ref) => bodies.read(ref, attachment) } : txDeps,
          );
          for (const o of ["delivered", "deferred", "bounced"] as const) {
            span.setAttribute(`mail.${o}.count`, r.filter((x) => x.outcome === o).length);
          }
          // the attempt's answer at a glance: the reply when every recipient got the same one
          const first = r[0];
          if (
            first &&
            r.every((x) => x.reply.code === first.reply.code && x.reply.enhanced === first.reply.enhanced)
          ) {
            span.setAttribute(attr.replyCode, first.reply.code);
            span.setAttribute(attr.replyEnhanced, first.reply.enhanced);
            span.setAttribute(attr.outcome, first.outcome);
          }
          return r;
        },
      );
    } finally {
      held();
      transactionSeconds.observe((performance.now() - started) / 1000);
    }
    await report(request, results);
  }

  return {
    workerId,
    handle,
    connector,
    close: () => connector.close(),
  };
}
