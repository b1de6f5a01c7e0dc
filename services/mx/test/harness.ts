// Test environment for mx: nats-server, a DNS server with SPF/DKIM/DMARC records, a directory file
// and a certificate in a temp dir; mx in-process (startMx) or as a process (env() for startService).
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { Writable } from "node:stream";
import { Bus, type Subscription } from "@mailpipe/bus";
import { type QueuedMail, QueuedMail as QueuedMailSchema, topology } from "@mailpipe/contracts";
import { dkimDnsRecord, generateDkimKey } from "@mailpipe/directory";
import { parseConfig } from "@mailpipe/service-kit";
import { createTelemetry, type Telemetry } from "@mailpipe/telemetry";
import {
  createSelfSignedCert,
  type DnsServerHandle,
  type NatsHandle,
  startDnsServer,
  startNats,
  type TempDir,
  tempDir,
  waitFor,
} from "@mailpipe/testing";
import { mxConfig } from "../src/config.ts";
import { type Mx, startMx } from "../src/mx.ts";

export const DIRECTORY = `domains:
  example.test:
    enforceDmarc: true
  strict.test:
    spfRejectAtMailFrom: true
  lenient.test:
    enforceDmarc: false
users:
  alice@example.test: {}
  bob@example.test: {}
  carol@strict.test: {}
  dave@lenient.test: {}
aliases:
  postmaster@example.test: [alice@example.test]
  team@example.test: [alice@example.test, bob@example.test]
`;

export const DKIM_SELECTOR = "s1";

export interface MxEnvironment {
  nats: NatsHandle;
  dns: DnsServerHandle;
  dir: TempDir;
  directoryFile: string;
  certFile: string;
  keyFile: string;
  /** PEM key whose public half is published as s1._domainkey.sender.test */
  dkimKey: string;
  /** environment variables for mx (NATS, DNS, directory, TLS, small limits) */
  env(extra?: Record<string, string>): Record<string, string>;
  stop(): Promise<void>;
}

/**
 * Senders, all with SPF `ip4:127.0.0.1 -all` (127.0.0.5 fails it):
 * sender.test (DMARC p=reject, DKIM key s1), none.test (p=none), reject.test (p=reject); and two
 * with DNS failures: flaky.test (SPF lookup SERVFAILs, DMARC p=reject), tempdmarc.test (DMARC SERVFAILs).
 */
export async function startEnvironment(): Promise<MxEnvironment> {
  const [nats, dir, cert, dkimKey] = await Promise.all([
    startNats(),
    tempDir("mx-test"),
    createSelfSignedCert({ hostnames: ["mx.test", "127.0.0.1"] }),
    generateDkimKey("rsa-sha256", { bits: 2048 }),
  ]);
  const spf = { TXT: ["v=spf1 ip4:127.0.0.1 -all"], ttl: 1 };
  const dns = await startDnsServer({
    records: {
      "sender.test": spf,
      "_dmarc.sender.test": { TXT: ["v=DMARC1; p=reject"], ttl: 1 },
      [`${DKIM_SELECTOR}._domainkey.sender.test`]: { TXT: [dkimDnsRecord(dkimKey)], ttl: 1 },
      "none.test": spf,
      "_dmarc.none.test": { TXT: ["v=DMARC1; p=none"], ttl: 1 },
      "reject.test": spf,
      "_dmarc.reject.test": { TXT: ["v=DMARC1; p=reject"], ttl: 1 },
      // DNS failures: flaky.test's SPF lookup fails (DMARC p=reject), tempdmarc.test's DMARC lookup fails
      "flaky.test": { rcode: "SERVFAIL" },
      "_dmarc.flaky.test": { TXT: ["v=DMARC1; p=reject"], ttl: 1 },
      "tempdmarc.test": spf,
      "_dmarc.tempdmarc.test": { rcode: "SERVFAIL" },
    },
  });
  const directoryFile = path.join(dir.path, "directory.yaml");
  const certFile = path.join(dir.path, "cert.pem");
  const keyFile = path.join(dir.path, "key.pem");
  await Promise.all([
    writeFile(directoryFile, DIRECTORY),
    writeFile(certFile, cert.cert),
    writeFile(keyFile, cert.key),
  ]);
  return {
    nats,
    dns,
    dir,
    directoryFile,
    certFile,
    keyFile,
    dkimKey,
    env: (extra = {}) => ({
      NATS_URL: nats.url,
      MAIL_HOSTNAME: "mx.test",
      MX_HOST: "127.0.0.1",
      MX_PORT: "0",
      DNS_SERVERS: dns.address,
      DIRECTORY_FILE: directoryFile,
      TLS_CERT_FILE: certFile,
      TLS_KEY_FILE: keyFile,
      MAX_MESSAGE_SIZE: "64K",
      MAX_RECIPIENTS: "5",
      LOG_LEVEL: "debug",
      ...extra,
    }),
    async stop() {
      await Promise.allSettled([nats.stop(), dns.stop()]);
      await dir.remove();
    },
  };
}

export interface InProcessMx {
  mx: Mx;
  port: number;
  bus: Bus;
  telemetry: Telemetry;
  logs: string[];
  /** what mx published on mail.v1.queued */
  queued: QueuedMail[];
  /** the stored body of a published message */
  body(queueId: string): Promise<string>;
  close(): Promise<void>;
}

/** mx in this process through startMx, with a consumer collecting what it publishes. */
export async function startInProcess(
  e: MxEnvironment,
  extra: Record<string, string> = {},
): Promise<InProcessMx> {
  const config = parseConfig(mxConfig, e.env(extra));
  const logs: string[] = [];
  const telemetry = createTelemetry({
    service: "mx",
    logLevel: "debug",
    defaultMetrics: false,
    logDestination: new Writable({
      write(chunk, _enc, cb) {
        logs.push(...String(chunk).split("\n").filter(Boolean));
        cb();
      },
    }),
  });
  const bus = await Bus.connect({ url: config.NATS_URL, name: "mx-test", telemetry });
  await bus.ensureTopology();
  await bus.jsm.streams.purge(topology.streams.queued.name).catch(() => {});
  const queued: QueuedMail[] = [];
  const attached = new Map<string, Buffer>();
  const sub: Subscription = await bus.consume("router", QueuedMailSchema, (m, ctx) => {
    if (ctx.attachment) attached.set(m.queueId, Buffer.from(ctx.attachment));
    queued.push(m);
  });
  const mx = await startMx({ config, telemetry, bus });
  return {
    mx,
    port: mx.edge.port,
    bus,
    telemetry,
    logs,
    queued,
    async body(queueId) {
      const q = await waitFor(() => queued.find((m) => m.queueId === queueId), {
        timeoutMs: 5000,
        message: `queued message ${queueId}`,
      });
      const bytes =
        "attached" in q.body ? attached.get(queueId) : await (await bus.bodies()).readBuffer(q.body);
      if (!bytes) throw new Error(`no body recorded for ${queueId}`);
      return bytes.toString("latin1");
    },
    async close() {
      await mx.close(2000);
      await sub.stop();
      await bus.close();
    },
  };
}

/** The queue ID in a `250 2.0.0 OK: queued as <id>` reply. */
export function queueIdOf(reply: string): string {
  const m = /queued as ([0-9A-Z]{26})/.exec(reply);
  if (!m) throw new Error(`not an acceptance reply: ${reply}`);
  return m[1]!;
}
