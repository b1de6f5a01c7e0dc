// Test harness: an edge on a free loopback port, a real bus on a test nats-server, and a consumer
// that collects what the edge published. Not exported from the package.
import { Writable } from "node:stream";
import { Bus, type Subscription } from "@mailpipe/bus";
import { type QueuedMail, QueuedMail as QueuedMailSchema, topology } from "@mailpipe/contracts";
import { createTelemetry, InMemorySpanExporter, type Telemetry } from "@mailpipe/telemetry";
import type { IncomingMessage } from "../src/intake.ts";
import {
  createSmtpEdge,
  type EdgeHooks,
  type SmtpEdge,
  type SmtpEdgeOptions,
  type Transaction,
} from "../src/server.ts";
import { type RawConnectOptions, RawSmtp } from "./raw-smtp.ts";

export interface EdgeHarness {
  edge: SmtpEdge;
  bus: Bus;
  telemetry: Telemetry;
  spans: InMemorySpanExporter;
  /** JSON log lines of the service */
  logs: string[];
  /** what the edge published to the spool */
  queued: QueuedMail[];
  /** the stored body of a published message (its attachment, or the Object Store's copy) */
  body(q: QueuedMail): Promise<Buffer>;
  /** messages the message hook saw */
  seen: { tx: Transaction; message: IncomingMessage }[];
  connect(opts?: Partial<RawConnectOptions>): Promise<RawSmtp>;
  close(): Promise<void>;
}

export type HarnessOptions = Partial<Omit<SmtpEdgeOptions, "hooks" | "bus" | "telemetry">> & {
  hooks?: Partial<EdgeHooks>;
};

export async function startEdge(natsUrl: string, opts: HarnessOptions = {}): Promise<EdgeHarness> {
  const logs: string[] = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      logs.push(...String(chunk).split("\n").filter(Boolean));
      cb();
    },
  });
  const spans = new InMemorySpanExporter();
  const telemetry = createTelemetry({
    service: opts.service ?? "mx",
    logLevel: "debug",
    logDestination: sink,
    defaultMetrics: false,
    spanExporter: spans,
  });
  const bus = await Bus.connect({ url: natsUrl, name: "edge-test", telemetry, publishTimeoutMs: 2000 });
  await bus.ensureTopology();
  await bus.jsm.streams.purge(topology.streams.queued.name).catch(() => {});
  const queued: QueuedMail[] = [];
  const attached = new Map<string, Buffer>();
  const sub: Subscription = await bus.consume("router", QueuedMailSchema, (m, ctx) => {
    if (ctx.attachment) attached.set(m.queueId, Buffer.from(ctx.attachment));
    queued.push(m);
  });
  const seen: EdgeHarness["seen"] = [];
  const { hooks, ...rest } = opts;
  const edge = await createSmtpEdge({
    service: "mx",
    hostname: "mx.test",
    host: "127.0.0.1",
    port: 0,
    maxMessageSize: 1024 * 1024,
    maxRecipients: 10,
    maxConnections: 100,
    maxConnectionsPerIp: 20,
    idleTimeoutMs: 10_000,
    dataTimeoutMs: 10_000,
    sessionTimeoutMs: 60_000,
    ...rest,
    telemetry,
    bus,
    hooks: {
      ...hooks,
      message: async (tx, message) => {
        seen.push({ tx, message });
        return hooks?.message?.(tx, message);
      },
    },
  }).catch(async (err: unknown) => {
    await sub.stop();
    await bus.close();
    throw err;
  });
  await edge.listen();
  return {
    edge,
    bus,
    telemetry,
    spans,
    logs,
    queued,
    async body(q) {
      if ("attached" in q.body) {
        const bytes = attached.get(q.queueId);
        if (!bytes) throw new Error(`no attachment recorded for ${q.queueId}`);
        return bytes;
      }
      return (await bus.bodies()).readBuffer(q.body);
    },
    seen,
    connect: (c = {}) => RawSmtp.connect({ port: edge.port, ...c }),
    async close() {
      await edge.close({ timeoutMs: 2000 });
      await sub.stop();
      await bus.close();
    },
  };
}

/** EHLO, MAIL, RCPT, DATA → 354, asserting each step succeeds. */
export async function openData(
  c: RawSmtp,
  from = "sender@remote.test",
  to = ["alice@example.test"],
): Promise<void> {
  const steps = [`EHLO client.test`, `MAIL FROM:<${from}>`, ...to.map((t) => `RCPT TO:<${t}>`)];
  for (const step of steps) {
    const r = await c.command(step);
    if (r.code !== 250) throw new Error(`${step} answered ${r.lines.join(" | ")}`);
  }
  const data = await c.command("DATA");
  if (data.code !== 354) throw new Error(`DATA answered ${data.lines.join(" | ")}`);
}
