// Test support (not loaded by the service): real NATS, Redis and DNS, an in-process router, and a
// stand-in for delivery and mda that records the requests it gets and reports statuses.
import { createHash } from "node:crypto";
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { Writable } from "node:stream";
import { Bus } from "@mailpipe/bus";
import {
  type EnvelopeRecipient,
  LocalDeliveryRequest,
  newQueueId,
  type Outcome,
  QueuedMail,
  RecipientStatus,
  RemoteDeliveryRequest,
  type Reply,
  subjects,
  topology,
} from "@mailpipe/contracts";
import { Directory } from "@mailpipe/directory";
import { createResolver } from "@mailpipe/dns";
import type { MailQueue } from "@mailpipe/queue";
import { parseConfig } from "@mailpipe/service-kit";
import { createTelemetry, InMemorySpanExporter, type Telemetry } from "@mailpipe/telemetry";
import {
  type DnsRecords,
  type DnsServerHandle,
  type NatsHandle,
  type ServerHandle,
  startDnsServer,
  startNats,
  startRedis,
  type TempDir,
  tempDir,
  waitFor,
} from "@mailpipe/testing";
import { Redis } from "ioredis";
import { config as configSchema } from "../src/config.ts";
import { type Router, startRouter } from "../src/router.ts";

export const DIRECTORY_YAML = `
domains:
  example.test: {}
users:
  alice@example.test: {}
  bob@example.test: {}
  carol@example.test: {}
  dave@example.test: {}
  erin@example.test: {}
aliases:
  team@example.test: [dave@example.test, erin@example.test]
  fwd@example.test: [friend@remote.test]
  loop1@example.test: [loop2@example.test]
  loop2@example.test: [loop1@example.test]
`;

export const DNS_RECORDS: Record<string, DnsRecords> = {
  "remote.test": {
    MX: [
      { exchange: "mx2.remote.test", priority: 20 },
      { exchange: "mx1.remote.test", priority: 10 },
    ],
  },
  "mx1.remote.test": { A: ["127.0.0.2"] },
  "mx2.remote.test": { A: ["127.0.0.3"] },
  "implicit.test": { A: ["127.0.0.4"] },
  "other.test": { MX: [{ exchange: "mx.other.test", priority: 5 }] },
  "mx.other.test": { A: ["127.0.0.5"] },
  "nullmx.test": { MX: [{ exchange: ".", priority: 0 }] },
  "servfail.test": { rcode: "SERVFAIL" },
};

export const MAIL_HOSTNAME = "mail.example.test";

export interface Environment {
  nats: NatsHandle;
  redis: ServerHandle;
  dns: DnsServerHandle;
  dir: TempDir;
  directoryFile: string;
  /** clean streams, consumers and Redis between tests */
  reset(): Promise<void>;
  stop(): Promise<void>;
}

export async function startEnvironment(): Promise<Environment> {
  const [nats, redis, dns, dir] = await Promise.all([
    startNats(),
    startRedis(),
    startDnsServer({ records: DNS_RECORDS }),
    tempDir("router-test"),
  ]);
  const directoryFile = path.join(dir.path, "directory.yaml");
  await writeFile(directoryFile, DIRECTORY_YAML);
  return {
    nats,
    redis,
    dns,
    dir,
    directoryFile,
    async reset() {
      const admin = await Bus.connect({ url: nats.url, name: "test-admin", telemetry: quietTelemetry() });
      try {
        for (const c of Object.values(topology.consumers))
          await admin.jsm.consumers.delete(c.stream, c.durable).catch(() => {});
        for (const s of Object.values(topology.streams))
          await admin.jsm.streams.purge(s.name).catch(() => {});
        await admin.jsm.streams.delete(topology.legacyQueued.name).catch(() => {});
      } finally {
        await admin.close();
      }
      const r = new Redis(redis.url);
      await r.flushall();
      r.disconnect();
      for (const [name, records] of Object.entries(DNS_RECORDS)) dns.set(name, records);
    },
    async stop() {
      await Promise.allSettled([nats.stop(), redis.stop(), dns.stop(), dir.remove()]);
    },
  };
}

export function quietTelemetry(exporter?: InMemorySpanExporter, lines?: string[]): Telemetry {
  const sink = new Writable({
    write(chunk, _enc, cb) {
      if (lines) for (const l of String(chunk).split("\n")) if (l) lines.push(l);
      cb();
    },
  });
  return createTelemetry({
    service: "router",
    logLevel: lines ? "debug" : "silent",
    logDestination: sink,
    defaultMetrics: false,
    ...(exporter ? { spanExporter: exporter } : {}),
  });
}

export interface TestRouter {
  router: Router;
  queue: MailQueue;
  telemetry: Telemetry;
  spans: InMemorySpanExporter;
  logs: string[];
  /** the value of a metric sample in this router's registry (0 when absent) */
  metric(name: string, labels?: Record<string, string>): Promise<number>;
  stop(): Promise<void>;
}

/** Starts a router in this process, with the test schedule (seconds) unless `env` says otherwise. */
export async function startTestRouter(
  envr: Environment,
  env: Record<string, string> = {},
): Promise<TestRouter> {
  const config = parseConfig(configSchema, {
    NATS_URL: envr.nats.url,
    REDIS_URL: envr.redis.url,
    MAIL_HOSTNAME,
    DIRECTORY_FILE: envr.directoryFile,
    DNS_SERVERS: envr.dns.address,
    RETRY_SCHEDULE: "1s,1s",
    RETRY_JITTER: "0",
    SCHEDULER_INTERVAL: "100ms",
    DSN_BATCH_DELAY: "500ms",
    QUEUE_LIFETIME: "1h",
    DELAY_WARNING: "0",
    ...env,
  });
  const spans = new InMemorySpanExporter();
  const logs: string[] = [];
  const telemetry = quietTelemetry(spans, logs);
  const bus = await Bus.connect({ url: config.NATS_URL, name: "router-test", telemetry });
  await bus.ensureTopology();
  const redis = new Redis(config.REDIS_URL, {
    maxRetriesPerRequest: 2,
    retryStrategy: (times) => Math.min(times * 100, 1000),
  });
  redis.on("error", () => {});
  const directory = await Directory.load(config.DIRECTORY_FILE);
  const router = await startRouter({
    config,
    telemetry,
    bus,
    redis,
    directory: () => directory,
    resolver: createResolver({ servers: config.DNS_SERVERS, timeoutMs: 500, tries: 1 }),
  });
  let stopped = false;
  return {
    router,
    queue: router.queue,
    telemetry,
    spans,
    logs,
    async metric(name, labels = {}) {
      const json = await telemetry.metrics.registry.getMetricsAsJSON();
      const m = json.find((x) => x.name === `mailpipe_${name}`);
      const values = (m?.values ?? []) as { value: number; labels: Record<string, string | number> }[];
      return values
        .filter((v) => Object.entries(labels).every(([k, want]) => String(v.labels[k]) === want))
        .reduce((sum, v) => sum + v.value, 0);
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      await router.stop();
      await bus.close();
      redis.disconnect();
    },
  };
}

export interface MailOptions {
  queueId?: string;
  mailFrom?: string;
  rcptTo: (string | EnvelopeRecipient)[];
  source?: "mx" | "msa" | "dsn" | "report";
  receivedAt?: string;
  /** Nats-Msg-Id of the queued publish (default: the queue id) */
  msgId?: string;
  /** put the body in the Object Store (as for large messages) instead of attaching it */
  objectStore?: boolean;
}

/** A queued test message and where the spool stored it. */
export type QueuedTestMail = QueuedMail & { spoolSeq: number };

/** Plays msa/mx (queues mail), delivery and mda (records requests, reports statuses). */
export interface Peers {
  bus: Bus;
  local: LocalDeliveryRequest[];
  remote: RemoteDeliveryRequest[];
  /** the body bytes a request carried with it, by dispatch id */
  attachments: Map<string, Buffer>;
  /** queues a message as mx does (body attached to its spool message, or in the Object Store) */
  queue(opts: MailOptions): Promise<QueuedTestMail>;
  /** reports one recipient's outcome for an attempt of `request` */
  status(
    request: LocalDeliveryRequest | RemoteDeliveryRequest,
    recipient: string,
    outcome: Outcome,
    reply: Reply,
    attempt?: number,
  ): Promise<void>;
  waitLocal(
    pred: (r: LocalDeliveryRequest) => boolean,
    what: string,
    timeoutMs?: number,
  ): Promise<LocalDeliveryRequest>;
  waitRemote(
    pred: (r: RemoteDeliveryRequest) => boolean,
    what: string,
    timeoutMs?: number,
  ): Promise<RemoteDeliveryRequest>;
  /** DSNs delivered to a local mailbox (null sender), raw */
  dsnsFor(mailbox: string): Promise<Buffer[]>;
  /** whether the message's spool entry or body is still stored */
  bodyExists(mail: QueuedTestMail): Promise<boolean>;
  stop(): Promise<void>;
}

/** With `consume: false` no worker takes requests: they wait in MAIL_DELIVER, as with every worker down. */
export async function startPeers(envr: Environment, opts: { consume?: boolean } = {}): Promise<Peers> {
  const bus = await Bus.connect({ url: envr.nats.url, name: "peers", telemetry: quietTelemetry() });
  await bus.ensureTopology();
  const bodies = await bus.bodies();
  const local: LocalDeliveryRequest[] = [];
  const remote: RemoteDeliveryRequest[] = [];
  const attachments = new Map<string, Buffer>();
  const subs =
    opts.consume === false
      ? []
      : [
          await bus.consume("mda", LocalDeliveryRequest, (m, ctx) => {
            if (ctx.attachment) attachments.set(m.dispatchId, Buffer.from(ctx.attachment));
            local.push(m);
          }),
          await bus.consume("delivery", RemoteDeliveryRequest, (m, ctx) => {
            if (ctx.attachment) attachments.set(m.dispatchId, Buffer.from(ctx.attachment));
            remote.push(m);
          }),
        ];
  const find = async <T>(list: T[], pred: (r: T) => boolean, what: string, timeoutMs = 10_000) =>
    waitFor(() => list.find(pred), { timeoutMs, message: `waiting for ${what}` });
  return {
    bus,
    local,
    remote,
    attachments,
    async queue(opts) {
      const queueId = opts.queueId ?? newQueueId();
      const mailFrom = opts.mailFrom ?? "sender@other.test";
      const raw = [
        `From: Sender <${mailFrom || "mailer-daemon@other.test"}>`,
        `To: ${opts.rcptTo.map((r) => (typeof r === "string" ? r : r.address)).join(", ")}`,
        "Subject: Quarterly report",
        `Message-ID: <${queueId}@other.test>`,
        "Date: Tue, 4 Mar 2025 09:05:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "The numbers are attached in spirit.",
        "",
      ].join("\r\n");
      const bytes = Buffer.from(raw);
      const body: QueuedMail["body"] = opts.objectStore
        ? await bodies.put(queueId, bytes)
        : { attached: true, size: bytes.length, sha256: createHash("sha256").update(bytes).digest("hex") };
      const mail: QueuedMail = {
        v: 1,
        queueId,
        source: opts.source ?? "mx",
        receivedAt: opts.receivedAt ?? new Date().toISOString(),
        envelope: {
          mailFrom,
          rcptTo: opts.rcptTo.map((r) => (typeof r === "string" ? { address: r } : r)),
          smtputf8: false,
          bodyType: "7BIT",
        },
        body,
        messageId: `<${queueId}@other.test>`,
      };
      const ack = await bus.publish(subjects.queued(), QueuedMail, mail, {
        msgId: opts.msgId ?? queueId,
        ...(opts.objectStore ? {} : { attachment: bytes }),
      });
      return { ...mail, spoolSeq: ack.seq };
    },
    async status(request, recipient, outcome, reply, attempt) {
      const rcpt = request.recipients.find((r) =>
        "mailbox" in r ? r.mailbox === recipient || r.address === recipient : r.address === recipient,
      );
      const s: RecipientStatus = {
        v: 1,
        queueId: request.queueId,
        dispatchId: request.dispatchId,
        recipient,
        outcome,
        reply,
        attempt: attempt ?? rcpt?.attempt ?? 1,
        service: "destination" in request ? "delivery" : "mda",
        at: new Date().toISOString(),
        ...("destination" in request
          ? { remoteMta: request.destination.hosts[0]?.exchange, destination: request.destination.domain }
          : {}),
        // as a worker does: the status names the request's destination slot, so the router releases it
        ...("slot" in request && request.slot
          ? { slot: { site: request.slot.site, token: request.slot.token } }
          : {}),
      };
      await bus.publish(subjects.status(outcome), RecipientStatus, s, {
        msgId: `${request.dispatchId}:${recipient}:${outcome}:${s.attempt}:${Math.random()}`,
      });
    },
    waitLocal: (pred, what, timeoutMs) => find(local, pred, what, timeoutMs),
    waitRemote: (pred, what, timeoutMs) => find(remote, pred, what, timeoutMs),
    async dsnsFor(mailbox) {
      const out: Buffer[] = [];
      for (const req of local) {
        if (req.mailFrom !== "" || !req.recipients.some((r) => r.mailbox === mailbox)) continue;
        out.push(await bodies.readBuffer(req.body));
      }
      return out;
    },
    async bodyExists(mail) {
      const spooled = await bus.jsm.direct
        .getMessage(topology.streams.queued.name, { seq: mail.spoolSeq })
        .then((m) => m !== null)
        .catch(() => false);
      return spooled || ("key" in mail.body && (await bodies.exists(mail.body.key)));
    },
    async stop() {
      for (const s of subs) await s.stop();
      await bus.close();
    },
  };
}

export interface ParsedReport {
  perMessage: Record<string, string>;
  recipients: Record<string, string>[];
}

/** Splits a message/delivery-status body into its field groups (unfolding continuation lines). */
export function parseDeliveryStatus(text: string): ParsedReport {
  const groups = text
    .replace(/\r\n/g, "\n")
    .replace(/\n[ \t]+/g, " ")
    .split(/\n\s*\n/)
    .map((g) => g.trim())
    .filter(Boolean)
    .map((g) => {
      const fields: Record<string, string> = {};
      for (const line of g.split("\n")) {
        const i = line.indexOf(":");
        if (i > 0) fields[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
      }
      return fields;
    });
  return { perMessage: groups[0] ?? {}, recipients: groups.slice(1) };
}
