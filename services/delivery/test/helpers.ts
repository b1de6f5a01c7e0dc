// Shared set-up for delivery's tests: real NATS, SMTP peers on loopback addresses sharing one
// port (SMTP_REMOTE_PORT is one number for every MX), requests published the way router does.
import net from "node:net";
import { Writable } from "node:stream";
import { Bus } from "@mailpipe/bus";
import {
  type MailEvent,
  type MxHost,
  newQueueId,
  RecipientStatus,
  RemoteDeliveryRequest,
  subjects,
  topology,
} from "@mailpipe/contracts";
import { parseConfig } from "@mailpipe/service-kit";
import { createTelemetry, type InMemorySpanExporter, type Telemetry } from "@mailpipe/telemetry";
import { freePort, type SmtpPeer, type StartSmtpPeerOptions, startSmtpPeer } from "@mailpipe/testing";
import { type Config, config as configSchema } from "../src/config.ts";
import { WORKER_HEADER } from "../src/worker.ts";

export function quietTelemetry(exporter?: InMemorySpanExporter): Telemetry {
  const sink = new Writable({ write: (_c, _e, cb) => cb() });
  return createTelemetry({
    service: "delivery",
    logDestination: sink,
    defaultMetrics: false,
    ...(exporter ? { spanExporter: exporter } : {}),
  });
}

/** Test defaults: loopback allowed, short waits. */
export function testConfig(natsUrl: string, port: number, env: Record<string, string> = {}): Config {
  return parseConfig(configSchema, {
    NATS_URL: natsUrl,
    MAIL_HOSTNAME: "out.sender.test",
    SMTP_REMOTE_PORT: String(port),
    SMTP_BLOCK_LOCAL_ADDRESSES: "false",
    DESTINATION_BUSY_DELAY: "200ms",
    SMTP_CONNECT_TIMEOUT: "3s",
    SMTP_GREETING_TIMEOUT: "10s",
    SMTP_COMMAND_TIMEOUT: "10s",
    SMTP_DATA_INIT_TIMEOUT: "10s",
    SMTP_DATA_BLOCK_TIMEOUT: "10s",
    SMTP_DATA_DONE_TIMEOUT: "10s",
    LOG_LEVEL: "silent",
    MTA_STS: "off",
    ...env,
  });
}

export async function connectBus(url: string, telemetry = quietTelemetry()): Promise<Bus> {
  const bus = await Bus.connect({ url, name: "delivery-test", telemetry });
  await bus.ensureTopology();
  return bus;
}

/** Empties the streams and drops the consumers, so each test starts clean. */
export async function resetBus(bus: Bus): Promise<void> {
  for (const s of Object.values(topology.streams)) await bus.jsm.streams.purge(s.name).catch(() => {});
  for (const c of Object.values(topology.consumers)) {
    await bus.jsm.consumers.delete(c.stream, c.durable).catch(() => {});
  }
}

/**
 * Peers on several loopback addresses, all on one port. A port free on the first address may be
 * taken on another; then all of them move to a new port.
 */
export async function startPeers(
  hosts: string[],
  options: (host: string) => Omit<StartSmtpPeerOptions, "host" | "port"> = () => ({}),
): Promise<{ port: number; peers: SmtpPeer[] }> {
  let lastError: unknown;
  for (let round = 0; round < 5; round++) {
    const port = await freePort(hosts[0]);
    const peers: SmtpPeer[] = [];
    try {
      for (const host of hosts) peers.push(await startSmtpPeer({ ...options(host), host, port }));
      return { port, peers };
    } catch (err) {
      lastError = err;
      await Promise.all(peers.map((p) => p.stop()));
    }
  }
  throw lastError;
}

export function mx(exchange: string, priority: number, ...addresses: string[]): MxHost {
  return { exchange, priority, addresses };
}

export interface RequestSpec {
  domain: string;
  hosts: MxHost[];
  recipients: string[];
  body: Buffer | string;
  mailFrom?: string;
  smtputf8?: boolean;
  bodyType?: "7BIT" | "8BITMIME";
  attempt?: number;
}

/** Stores the body and publishes a RemoteDeliveryRequest, as router does. */
export async function publishRequest(bus: Bus, spec: RequestSpec): Promise<RemoteDeliveryRequest> {
  const queueId = newQueueId();
  const body = await (await bus.bodies()).put(
    queueId,
    typeof spec.body === "string" ? Buffer.from(spec.body) : spec.body,
  );
  const request: RemoteDeliveryRequest = {
    v: 1,
    queueId,
    dispatchId: `${queueId}.${spec.domain}.1`,
    receivedAt: new Date().toISOString(),
    mailFrom: spec.mailFrom ?? "alice@sender.test",
    destination: { domain: spec.domain, hosts: spec.hosts },
    recipients: spec.recipients.map((address) => ({ address, attempt: spec.attempt ?? 1 })),
    smtputf8: spec.smtputf8 ?? false,
    bodyType: spec.bodyType ?? "7BIT",
    body,
  };
  await bus.publish(subjects.deliverRemote(spec.domain), RemoteDeliveryRequest, request, {
    msgId: request.dispatchId,
  });
  return request;
}

export interface SeenStatus {
  status: RecipientStatus;
  subject: string;
  worker: string | undefined;
}

/** Reads MAIL_STATUS the way router does (its durable), keeping every status with its worker header. */
export async function collectStatuses(bus: Bus) {
  const seen: SeenStatus[] = [];
  const sub = await bus.consume(
    "routerStatus",
    RecipientStatus,
    (status, ctx) => {
      seen.push({ status, subject: ctx.subject, worker: ctx.headers?.get(WORKER_HEADER) || undefined });
    },
    { maxInFlight: 256 },
  );
  return {
    seen,
    stop: () => sub.stop(),
    /** waits until `n` statuses arrived (bounded) */
    async waitFor(n: number, timeoutMs = 20_000): Promise<SeenStatus[]> {
      const deadline = Date.now() + timeoutMs;
      while (seen.length < n) {
        if (Date.now() > deadline) {
          throw new Error(`got ${seen.length} of ${n} statuses in ${timeoutMs} ms`);
        }
        await new Promise((r) => setTimeout(r, 20));
      }
      return seen.slice();
    },
    of(recipient: string): SeenStatus[] {
      return seen.filter((s) => s.status.recipient === recipient);
    },
  };
}

/** A 2 KB-ish RFC 5322 message with CRLF line ends. */
export function message(subject: string, to = "bob@remote.test", extra = ""): string {
  const filler = "The quick brown fox jumps over the lazy dog. ".repeat(40);
  return [
    "From: Alice <alice@sender.test>",
    `To: ${to}`,
    `Subject: ${subject}`,
    `Message-ID: <${newQueueId()}@sender.test>`,
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=us-ascii",
    "",
    "Hello,",
    ".a line that starts with a dot",
    filler,
    extra,
    "",
  ].join("\r\n");
}

export interface RawServer {
  port: number;
  /** every command line received, per connection, in order */
  sessions: string[][];
  /** message bodies, dot-stuffing left as received */
  messages: string[];
  /** connections currently open */
  readonly open: number;
  stop(): Promise<void>;
}

export interface RawServerOptions {
  /** EHLO keywords to advertise, exactly */
  extensions?: string[];
  /** wait this long before answering the end of data */
  dataReplyDelayMs?: number;
  /**
   * after this many messages on one session, answer the next command `421` and close, as a server
   * does when it ends a session the client thought it could reuse
   */
  closeAfterMessages?: number;
  port?: number;
}

/**
 * A minimal SMTP server that records every command line it gets, for what smtp-server does not
 * expose (MAIL FROM parameters, QUIT) or does differently (which extensions it advertises).
 */
export async function rawSmtpServer(host: string, options: RawServerOptions = {}): Promise<RawServer> {
  const extensions = options.extensions ?? ["PIPELINING", "8BITMIME", "SMTPUTF8"];
  const sessions: string[][] = [];
  const messages: string[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    const lines: string[] = [];
    sessions.push(lines);
    let buffer = "";
    let data: string | undefined;
    let accepted = 0;
    socket.write("220 raw.test ESMTP\r\n");
    socket.on("data", (chunk) => {
      buffer += chunk.toString("utf8");
      for (let i = buffer.indexOf("\r\n"); i >= 0; i = buffer.indexOf("\r\n")) {
        const line = buffer.slice(0, i);
        buffer = buffer.slice(i + 2);
        if (data !== undefined) {
          if (line === ".") {
            messages.push(data);
            data = undefined;
            accepted++;
            const answer = () => socket.writable && socket.write("250 2.0.0 Ok\r\n");
            if (options.dataReplyDelayMs) setTimeout(answer, options.dataReplyDelayMs);
            else answer();
          } else data += `${line}\r\n`;
          continue;
        }
        lines.push(line);
        const verb = line.slice(0, 4).toUpperCase();
        if (options.closeAfterMessages !== undefined && accepted >= options.closeAfterMessages) {
          socket.end("421 4.4.2 raw.test closing this session\r\n");
          buffer = "";
          break;
        }
        if (verb === "EHLO") {
          const all = ["raw.test", ...extensions];
          socket.write(all.map((l, n) => `250${n === all.length - 1 ? " " : "-"}${l}\r\n`).join(""));
        } else if (verb === "DATA") {
          data = "";
          socket.write("354 go ahead\r\n");
        } else if (verb === "QUIT") {
          socket.end("221 2.0.0 bye\r\n");
        } else socket.write("250 2.0.0 Ok\r\n");
      }
    });
  });
  const port = options.port ?? (await freePort(host));
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, resolve);
  });
  return {
    port,
    sessions,
    messages,
    get open() {
      return sockets.size;
    },
    stop: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Every event published from now on (core NATS, as tracking reads them), parsed. */
export function collectEvents(bus: Bus) {
  const seen: MailEvent[] = [];
  const sub = bus.nc.subscribe(subjects.eventsAll(), {
    callback: (err, msg) => {
      if (!err) seen.push(JSON.parse(msg.string()) as MailEvent);
    },
  });
  return {
    seen,
    stop: async () => sub.unsubscribe(),
    /** waits until an event of `type` for `recipient` arrived (bounded) */
    async waitFor(type: MailEvent["type"], recipient: string, timeoutMs = 20_000): Promise<MailEvent> {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const e = seen.find((x) => x.type === type && x.recipient === recipient);
        if (e) return e;
        if (Date.now() > deadline) throw new Error(`no ${type} event for ${recipient} in ${timeoutMs} ms`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
  };
}
