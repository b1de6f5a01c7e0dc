// Test harness (not a test): real nats-server, redis-server and DNS on loopback, a directory file
// and a self-signed certificate in a temp dir, msa in-process or as processes, and a consumer that
// collects what msa published on mail.v1.queued.
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { Writable } from "node:stream";
import { Bus, type Subscription } from "@mailpipe/bus";
import { type QueuedMail, QueuedMail as QueuedMailSchema } from "@mailpipe/contracts";
import { dkimDnsRecord, generateDkimKey, hashPassword } from "@mailpipe/directory";
import { createResolver, mailauthResolver } from "@mailpipe/dns";
import { parseConfig } from "@mailpipe/service-kit";
import { createTelemetry, type Telemetry } from "@mailpipe/telemetry";
import {
  createSelfSignedCert,
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
import type { DNSResolver } from "mailauth";
import { type MsaConfig, msaConfig } from "../src/config.ts";
import { type Msa, startMsa } from "../src/msa.ts";

export const PASSWORDS = {
  "alice@example.test": "alice-secret-1",
  "bob@example.test": "bob-secret-2",
  "dave@example.test": "dave-secret-3",
  "erin@example.test": "erin-secret-4",
} as const;

export interface Infra {
  nats: NatsHandle;
  redis: ServerHandle;
  dns: DnsServerHandle;
  dir: TempDir;
  directoryFile: string;
  certFile: string;
  keyFile: string;
  /** mailauth's resolver option, on the test DNS server */
  resolver: DNSResolver;
  /** what every msa here runs with (ports, files, servers) */
  env: Record<string, string>;
  /** a bus for the test itself: the consumer and the body store */
  bus: Bus;
  queued: QueuedMail[];
  body(m: QueuedMail): Promise<string>;
  stop(): Promise<void>;
}

const quiet = () =>
  new Writable({
    write(_c, _e, cb) {
      cb();
    },
  });

export async function startInfra(): Promise<Infra> {
  const [nats, redis, dir, cert, rsa, ed] = await Promise.all([
    startNats(),
    startRedis(),
    tempDir("msa-test"),
    createSelfSignedCert({ hostnames: ["mail.example.test", "127.0.0.1"] }),
    generateDkimKey("rsa-sha256"),
    generateDkimKey("ed25519-sha256"),
  ]);
  const file = (name: string) => path.join(dir.path, name);
  await Promise.all([
    writeFile(file("cert.pem"), cert.cert),
    writeFile(file("key.pem"), cert.key),
    writeFile(file("example.test.pem"), rsa),
    writeFile(file("example.org.pem"), ed),
  ]);
  // cheaper scrypt than production (ln=15) keeps the many logins of these tests fast
  const hashes = Object.fromEntries(
    await Promise.all(
      Object.entries(PASSWORDS).map(async ([u, p]) => [u, await hashPassword(p, { ln: 10 })]),
    ),
  ) as Record<keyof typeof PASSWORDS, string>;
  const directoryFile = file("directory.yaml");
  await writeFile(
    directoryFile,
    `domains:
  example.test:
    dkim: { selector: mail, privateKeyFile: example.test.pem }
  example.org:
    dkim: { selector: ed, privateKeyFile: example.org.pem }
  nokey.test:
users:
  alice@example.test:
    password: "${hashes["alice@example.test"]}"
    sendAs: ["@example.org", "@nokey.test"]
  bob@example.test:
    password: "${hashes["bob@example.test"]}"
  dave@example.test:
    password: "${hashes["dave@example.test"]}"
  erin@example.test:
    password: "${hashes["erin@example.test"]}"
aliases:
  team@example.test: [alice@example.test, bob@example.test]
`,
  );
  const dns = await startDnsServer({
    records: {
      "mail._domainkey.example.test": { TXT: [dkimDnsRecord(rsa)] },
      "ed._domainkey.example.org": { TXT: [dkimDnsRecord(ed)] },
    },
  });
  const telemetry = createTelemetry({ service: "router", logDestination: quiet(), defaultMetrics: false });
  const bus = await Bus.connect({ url: nats.url, name: "msa-test", telemetry });
  await bus.ensureTopology();
  const queued: QueuedMail[] = [];
  const attached = new Map<string, Buffer>();
  const sub: Subscription = await bus.consume("router", QueuedMailSchema, (m, ctx) => {
    if (ctx.attachment) attached.set(m.queueId, Buffer.from(ctx.attachment));
    queued.push(m);
  });
  const env = {
    NATS_URL: nats.url,
    REDIS_URL: redis.url,
    MAIL_HOSTNAME: "mail.example.test",
    DIRECTORY_FILE: directoryFile,
    TLS_CERT_FILE: file("cert.pem"),
    TLS_KEY_FILE: file("key.pem"),
    MSA_HOST: "127.0.0.1",
    MSA_SUBMISSION_PORT: "0",
    MSA_SUBMISSIONS_PORT: "0",
    HTTP_HOST: "127.0.0.1",
    HTTP_PORT: "0",
    LOG_LEVEL: "debug",
  };
  return {
    nats,
    redis,
    dns,
    dir,
    directoryFile,
    certFile: file("cert.pem"),
    keyFile: file("key.pem"),
    resolver: mailauthResolver(createResolver({ servers: [dns.address] })) as DNSResolver,
    env,
    bus,
    queued,
    async body(m) {
      const bytes =
        "attached" in m.body ? attached.get(m.queueId) : await (await bus.bodies()).readBuffer(m.body);
      if (!bytes) throw new Error(`no body recorded for ${m.queueId}`);
      return bytes.toString("utf8");
    },
    async stop() {
      await sub.stop();
      await bus.close();
      await Promise.allSettled([nats.stop(), redis.stop(), dns.stop()]);
      await dir.remove();
    },
  };
}

export interface InProcessMsa {
  msa: Msa;
  config: MsaConfig;
  telemetry: Telemetry;
  /** JSON log lines */
  logs: Record<string, unknown>[];
  submissionPort: number;
  submissionsPort: number;
  close(): Promise<void>;
}

/** msa in this process, on free loopback ports, with `env` over the infra's. */
export async function startInProcess(infra: Infra, env: Record<string, string> = {}): Promise<InProcessMsa> {
  const config = parseConfig(msaConfig, { ...infra.env, ...env });
  const logs: Record<string, unknown>[] = [];
  const telemetry = createTelemetry({
    service: "msa",
    logLevel: config.LOG_LEVEL,
    logDestination: new Writable({
      write(chunk, _e, cb) {
        for (const l of String(chunk).split("\n")) if (l) logs.push(JSON.parse(l));
        cb();
      },
    }),
    defaultMetrics: false,
  });
  const bus = await Bus.connect({ url: config.NATS_URL, name: "msa", telemetry });
  await bus.ensureTopology([]);
  const redis = new Redis(config.REDIS_URL, { maxRetriesPerRequest: 1 });
  redis.on("error", () => {}); // a test may stop Redis on purpose; commands still fail as they should
  const msa = await startMsa({ config, telemetry, bus, redis });
  return {
    msa,
    config,
    telemetry,
    logs,
    submissionPort: msa.submission.port,
    submissionsPort: msa.submissions.port,
    async close() {
      await msa.close(1000);
      await bus.close();
      redis.disconnect();
    },
  };
}

/**
 * Runs `refused` (which must get a refusal), then submits a message through `barrier` and waits
 * for it: when the barrier arrives and nothing else did, the refused attempt published nothing.
 */
export async function expectNothingPublished(
  infra: Infra,
  refused: () => Promise<void>,
  barrier: () => Promise<string>,
): Promise<void> {
  const before = infra.queued.length;
  await refused();
  const queueId = await barrier();
  await waitFor(() => infra.queued.length > before, { message: "the barrier message was not published" });
  await new Promise((r) => setTimeout(r, 100));
  const after = infra.queued.slice(before);
  if (after.length !== 1 || after[0]?.queueId !== queueId) {
    throw new Error(
      `expected only the barrier ${queueId} to be published, got ${after.map((m) => m.queueId).join(", ")}`,
    );
  }
}

/** The queue ID in a `250 2.0.0 OK: queued as <id>` reply. */
export function queueIdOf(response: string): string {
  const m = /queued as ([0-9A-Z]{26})/.exec(response);
  if (!m?.[1]) throw new Error(`no queue ID in ${JSON.stringify(response)}`);
  return m[1];
}

export async function published(infra: Infra, queueId: string): Promise<QueuedMail> {
  return waitFor(() => infra.queued.find((m) => m.queueId === queueId), {
    message: `message ${queueId} was not published`,
  });
}
