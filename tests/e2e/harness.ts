// End-to-end harness: real nats-server, redis-server, DNS on loopback, and the real service
// processes, wired the way `npm start` wires them, in a temp folder per test file.
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { developmentDirectory } from "@mailpipe/directory";
import {
  createSelfSignedCert,
  type DnsRecords,
  type DnsServerHandle,
  freePort,
  type NatsClusterHandle,
  type NatsHandle,
  type OtlpReceiver,
  type ServerHandle,
  type ServiceHandle,
  startDnsServer,
  startNats,
  startNatsCluster,
  startOtlpReceiver,
  startRedis,
  startService,
  type TempDir,
  tempDir,
} from "@mailpipe/testing";

export type ServiceName = "mx" | "msa" | "router" | "delivery" | "mda";

export interface PipelineOptions {
  services: ServiceName[];
  /** extra environment for every service */
  env?: Record<string, string>;
  /** extra environment per service */
  serviceEnv?: Partial<Record<ServiceName, Record<string, string>>>;
  dns?: Record<string, DnsRecords>;
  /** appended to the development directory (YAML text), or a whole directory file */
  directory?: string;
  tracing?: boolean;
  /** extra node flags for every service, e.g. ["--cpu-prof"] */
  nodeArgs?: string[];
  /** open nats-server's monitoring port (benchmarks read /varz and /connz) */
  natsMonitor?: boolean;
  /** Redis's AOF fsync policy (default everysec; production manifests run always) */
  redisAppendfsync?: "always" | "everysec";
  /** a 3-node NATS cluster (every service gets all three URLs and JS_REPLICAS=3) instead of one server */
  natsCluster?: boolean;
}

export interface Pipeline {
  dir: TempDir;
  /** the single nats-server (not with `natsCluster`: use `cluster`) */
  nats: NatsHandle;
  cluster: NatsClusterHandle | undefined;
  /** what the services' NATS_URL is */
  natsUrl: string;
  redis: ServerHandle;
  dns: DnsServerHandle;
  otlp: OtlpReceiver | undefined;
  maildirRoot: string;
  directoryFile: string;
  cert: { key: string; cert: string };
  ports: { mx: number; submission: number; submissions: number; remoteSmtp: number };
  env: Record<string, string>;
  services: Map<string, ServiceHandle>;
  start(name: ServiceName, id?: string, extraEnv?: Record<string, string>): Promise<ServiceHandle>;
  /** every file in a user's Maildir new/ (and cur/), with its content */
  mailbox(address: string, folder?: string): Promise<{ name: string; content: Buffer }[]>;
  /** number of files across every Maildir under the root */
  countAllMail(): Promise<number>;
  stop(): Promise<void>;
}

export async function startPipeline(opts: PipelineOptions): Promise<Pipeline> {
  const dir = await tempDir("mailpipe-e2e");
  const [single, cluster, redis] = await Promise.all([
    opts.natsCluster ? undefined : startNats({ monitor: opts.natsMonitor ?? false }),
    opts.natsCluster ? startNatsCluster() : undefined,
    startRedis({ appendfsync: opts.redisAppendfsync ?? "everysec" }),
  ]);
  const natsUrl = cluster ? cluster.url : single!.url;
  const dns = await startDnsServer({ records: opts.dns ?? {} });
  const otlp = opts.tracing ? await startOtlpReceiver() : undefined;
  const keyDir = join(dir.path, "dkim");
  const directoryFile = join(dir.path, "directory.yaml");
  await writeFile(directoryFile, opts.directory ?? (await developmentDirectory({ keyDir })));
  const cert = await createSelfSignedCert({ hostnames: ["mail.example.test", "localhost", "127.0.0.1"] });
  await writeFile(join(dir.path, "cert.pem"), cert.cert);
  await writeFile(join(dir.path, "key.pem"), cert.key);
  const maildirRoot = join(dir.path, "mail");
  const ports = {
    mx: await freePort(),
    submission: await freePort(),
    submissions: await freePort(),
    remoteSmtp: await freePort("127.0.0.2"),
  };
  const env: Record<string, string> = {
    NATS_URL: natsUrl,
    ...(cluster ? { JS_REPLICAS: "3" } : {}),
    REDIS_URL: redis.url,
    DNS_SERVERS: dns.address,
    DIRECTORY_FILE: directoryFile,
    MAIL_HOSTNAME: "mail.example.test",
    MAILDIR_ROOT: maildirRoot,
    TLS_CERT_FILE: join(dir.path, "cert.pem"),
    TLS_KEY_FILE: join(dir.path, "key.pem"),
    MX_HOST: "127.0.0.1",
    MX_PORT: String(ports.mx),
    MSA_HOST: "127.0.0.1",
    MSA_SUBMISSION_PORT: String(ports.submission),
    MSA_SUBMISSIONS_PORT: String(ports.submissions),
    SMTP_REMOTE_PORT: String(ports.remoteSmtp),
    SMTP_BLOCK_LOCAL_ADDRESSES: "false",
    SHUTDOWN_TIMEOUT: "10s",
    LOG_LEVEL: "info",
    ...(otlp ? { OTEL_EXPORTER_OTLP_ENDPOINT: otlp.url, OTEL_BSP_SCHEDULE_DELAY: "200" } : {}),
    ...opts.env,
  };
  const services = new Map<string, ServiceHandle>();
  const pipeline: Pipeline = {
    dir,
    get nats(): NatsHandle {
      if (!single) throw new Error("this pipeline runs a NATS cluster: use pipeline.cluster");
      return single;
    },
    cluster,
    natsUrl,
    redis,
    dns,
    otlp,
    maildirRoot,
    directoryFile,
    cert,
    ports,
    env,
    services,
    async start(name, id = name, extraEnv = {}) {
      const handle = await startService(name, {
        env: { ...env, ...opts.serviceEnv?.[name], ...extraEnv },
        readyTimeoutMs: 30_000,
        ...(opts.nodeArgs ? { nodeArgs: opts.nodeArgs } : {}),
      });
      services.set(id, handle);
      return handle;
    },
    async mailbox(address, folder) {
      const [local, domain] = [
        address.slice(0, address.lastIndexOf("@")),
        address.slice(address.lastIndexOf("@") + 1),
      ];
      const base = join(
        maildirRoot,
        domain!,
        local!.toLowerCase(),
        "Maildir",
        ...(folder ? [`.${folder}`] : []),
      );
      const out: { name: string; content: Buffer }[] = [];
      for (const sub of ["new", "cur"]) {
        const names = await readdir(join(base, sub)).catch(() => [] as string[]);
        for (const name of names.sort()) out.push({ name, content: await readFile(join(base, sub, name)) });
      }
      return out;
    },
    async countAllMail() {
      let n = 0;
      const walk = async (p: string): Promise<void> => {
        const entries = await readdir(p, { withFileTypes: true }).catch(() => []);
        for (const e of entries) {
          if (!e.isDirectory()) continue;
          if (e.name === "new" || e.name === "cur") n += (await readdir(join(p, e.name))).length;
          else if (e.name !== "tmp") await walk(join(p, e.name));
        }
      };
      await walk(maildirRoot);
      return n;
    },
    async stop() {
      await Promise.all([...services.values()].map((s) => s.stop("SIGTERM", 15_000).catch(() => s.kill())));
      await Promise.all([single?.stop(), cluster?.stop(), redis.stop(), dns.stop(), otlp?.stop()]);
      await dir.remove();
    },
  };
  for (const name of opts.services) await pipeline.start(name);
  return pipeline;
}

/** Splits a stored message into its header lines (unfolded) and body. */
export function headersOf(raw: Buffer | string): { name: string; value: string }[] {
  const text = raw.toString();
  const end = text.indexOf("\r\n\r\n");
  const block = end >= 0 ? text.slice(0, end) : text;
  const out: { name: string; value: string }[] = [];
  for (const line of block.split("\r\n")) {
    if (/^[ \t]/.test(line) && out.length) out[out.length - 1]!.value += ` ${line.trim()}`;
    else {
      const i = line.indexOf(":");
      if (i > 0) out.push({ name: line.slice(0, i), value: line.slice(i + 1).trim() });
    }
  }
  return out;
}
