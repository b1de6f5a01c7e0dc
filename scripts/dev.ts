// `npm start`: the whole pipeline on loopback for development. Starts NATS (JetStream, file
// storage), Redis (AOF), a DNS server for the development domain, and every service under
// services/, with a development directory and TLS certificate; prints what is listening and how
// to send a first message. All data lives in one folder (.data/ unless MAILPIPE_DATA_DIR is set).
// Ctrl-C, SIGTERM or closing the terminal (SIGHUP) stops everything; a supervisor killed outright
// takes its children with it, and the next start stops any it finds left (scripts/dev-lifecycle.ts).
// Variables set in the environment reach the services and win over the defaults below
// (`MAILDIR_ROOT=/tmp/mail npm start`). `npm start -- --nats-cluster 3 --scale delivery=3,mx=2`
// runs a JetStream cluster and several processes per service (scripts/dev-scale.ts).
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { appendFile, mkdir, readFile, writeFile } from "node:fs/promises";
import { connect } from "node:net";
import { join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { developmentDirectory } from "@mailpipe/directory";
import { createSelfSignedCert } from "@mailpipe/testing";
import { startDevDns } from "./dev-dns.ts";
import {
  AlreadyRunningError,
  ensurePortsFree,
  PidFile,
  type PortUse,
  stopStale,
  withParentDeathSignal,
} from "./dev-lifecycle.ts";
import {
  httpPort,
  instances,
  natsNodeConfig,
  natsNodes,
  parseStartArgs,
  SERVICE_NAMES,
  type StartPlan,
  UsageError,
} from "./dev-scale.ts";

const root = fileURLToPath(new URL("..", import.meta.url));
const env = process.env;
const dataDir = resolve(env.MAILPIPE_DATA_DIR ?? join(root, ".data"));
const num = (name: string, fallback: number) => Number(env[name] ?? fallback);
const ports = {
  nats: num("DEV_NATS_PORT", 14222),
  redis: num("DEV_REDIS_PORT", 16379),
  dns: num("DEV_DNS_PORT", 15353),
  http: num("DEV_HTTP_PORT_BASE", 19100),
  mx: num("MX_PORT", 2525),
  submission: num("MSA_SUBMISSION_PORT", 2587),
  submissions: num("MSA_SUBMISSIONS_PORT", 2465),
};
const host = "127.0.0.1";
const rel = (p: string) => {
  const r = relative(process.cwd(), p);
  return r.startsWith("..") ? p : r || ".";
};
const color = process.stdout.isTTY
  ? (code: number, s: string) => `\x1b[${code}m${s}\x1b[0m`
  : (_c: number, s: string) => s;
const say = (msg: string) => process.stdout.write(`${color(36, "[mailpipe]")} ${msg}\n`);

const ORDER = SERVICE_NAMES;
type Name = (typeof ORDER)[number];
const services = ORDER.filter((n) => existsSync(join(root, "services", n, "src", "main.ts")));
let plan: StartPlan;
try {
  plan = parseStartArgs(process.argv.slice(2));
} catch (err) {
  if (!(err instanceof UsageError)) throw err;
  process.stderr.write(`${err.message}\n`);
  process.exit(64); // EX_USAGE
}
const processes = instances(plan, services);
const serviceProcs = new Set(processes.map((p) => p.name));

interface Proc {
  name: string;
  child: ChildProcess;
  exited: Promise<number | null>;
}
const procs = new Map<string, Proc>();
let stopping = false;
// every child's pid and start time, so that the next start can stop what this one leaves behind
const pidFile = new PidFile(join(dataDir, "npm-start.pids"));
const isInfrastructure = (name: string) => /^(nats|redis)\b/.test(name);

function waitPort(port: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolvePort, reject) => {
    const attempt = () => {
      const s = connect(port, host);
      s.once("connect", () => {
        s.destroy();
        resolvePort();
      });
      s.once("error", () => {
        s.destroy();
        if (Date.now() > deadline)
          reject(new Error(`nothing listens on ${host}:${port} after ${timeoutMs} ms`));
        else setTimeout(attempt, 100);
      });
    };
    attempt();
  });
}

/** One log line a person can read: time, service, level, message, queue id. */
function formatLine(name: string, line: string): string {
  try {
    const j = JSON.parse(line) as Record<string, unknown>;
    const time = typeof j.time === "string" ? j.time.slice(11, 19) : "";
    const level = String(j.level ?? "info");
    const lc = level === "error" || level === "fatal" ? 31 : level === "warn" ? 33 : 90;
    const extra = [
      j.queueId ? `queue=${j.queueId}` : "",
      j.err
        ? `err=${typeof j.err === "object" ? ((j.err as { message?: string }).message ?? "") : j.err}`
        : "",
    ]
      .filter(Boolean)
      .join(" ");
    return `${color(90, time)} ${color(35, name.padEnd(8))} ${color(lc, level.padEnd(5))} ${j.msg ?? ""} ${color(90, extra)}`;
  } catch {
    return `${color(35, name.padEnd(8))} ${line}`;
  }
}

function launch(name: string, cmd: string, args: string[], childEnv: NodeJS.ProcessEnv, quiet = false): Proc {
  // Own process group: Ctrl-C reaches only this supervisor, which stops the services before
  // NATS and Redis, so in-flight work finishes instead of failing against a vanished bus.
  // The parent-death signal stops the child when the supervisor dies without doing that.
  const [command, argv] = withParentDeathSignal(cmd, args);
  const child = spawn(command, argv, {
    cwd: root,
    env: childEnv,
    stdio: ["ignore", "pipe", "pipe"],
    detached: true,
  });
  const logFile = join(dataDir, "logs", `${name}.log`);
  const onData = (buf: Buffer) => {
    void appendFile(logFile, buf);
    if (quiet) return;
    for (const line of buf.toString("utf8").split("\n"))
      if (line.trim()) process.stdout.write(`${formatLine(name, line)}\n`);
  };
  child.stdout?.on("data", onData);
  child.stderr?.on("data", onData);
  const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
  const p = { name, child, exited };
  procs.set(name, p);
  pidFile.add(name, child.pid, cmd);
  void exited.then(() => pidFile.remove(name, child.pid));
  void exited.then(async (code) => {
    if (stopping || procs.get(name) !== p) return;
    say(color(31, `${name} exited with code ${code}; its log is ${rel(logFile)}. Stopping everything.`));
    await stopAll(1);
  });
  return p;
}

async function stopAll(code = 0): Promise<never> {
  if (!stopping) {
    stopping = true;
    say("stopping…");
    const svc = [...procs.values()].filter((p) => serviceProcs.has(p.name));
    const infra = [...procs.values()].filter((p) => !svc.includes(p));
    const stop = async (p: Proc) => {
      if (p.child.exitCode !== null) return;
      p.child.kill("SIGTERM");
      const t = setTimeout(() => p.child.kill("SIGKILL"), 40_000);
      await p.exited;
      clearTimeout(t);
    };
    await Promise.all(svc.map(stop));
    await Promise.all(infra.map(stop));
    pidFile.clear();
    say("stopped");
  }
  process.exit(code);
}

async function main(): Promise<void> {
  await mkdir(join(dataDir, "logs"), { recursive: true });
  // A closed terminal (SIGHUP) is a Ctrl-C nobody can see: stop the same way, and let the writes to
  // the vanished terminal fail quietly instead of crashing the supervisor half way through.
  for (const stream of [process.stdout, process.stderr]) stream.on("error", () => {});
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.on(signal, () => void stopAll(0));
  process.on("exit", () => {
    let left = false;
    for (const p of procs.values()) {
      if (p.child.exitCode !== null || p.child.signalCode !== null) continue;
      left = !p.child.kill("SIGKILL") || left;
    }
    if (!left) pidFile.clear();
  });

  // What an earlier npm start on this data folder left running (its supervisor was killed) is ours
  // to stop; a second npm start while the first still runs is refused.
  try {
    await stopStale(pidFile.path, { first: (name) => !isInfrastructure(name), say });
  } catch (err) {
    if (err instanceof AlreadyRunningError) {
      say(color(31, err.message));
      process.exit(1);
    }
    throw err;
  }

  // Development directory and keys, created once and kept.
  const directoryFile = env.DIRECTORY_FILE ?? join(dataDir, "directory.yaml");
  if (!existsSync(directoryFile)) {
    await writeFile(directoryFile, await developmentDirectory({ keyDir: join(dataDir, "dkim") }), {
      mode: 0o600,
    });
    say(`wrote the development directory ${rel(directoryFile)}`);
  }
  const certFile = env.TLS_CERT_FILE ?? join(dataDir, "tls", "cert.pem");
  const keyFile = env.TLS_KEY_FILE ?? join(dataDir, "tls", "key.pem");
  if (!existsSync(certFile) || !existsSync(keyFile)) {
    await mkdir(join(dataDir, "tls"), { recursive: true });
    const { cert, key } = await createSelfSignedCert({ hostnames: ["mail.example.test", "localhost", host] });
    await writeFile(certFile, cert);
    await writeFile(keyFile, key, { mode: 0o600 });
    say(`wrote a self-signed development certificate ${rel(certFile)}`);
  }

  // Every port this start needs, checked before anything starts: a taken one is named with the
  // process that holds it and the variable that moves it.
  // <SERVICE>_HTTP_PORT moves the first process of a service; its replicas follow DEV_HTTP_PORT_BASE
  const httpPortOf = (name: Name, replica: number) =>
    replica === 0 && env[`${name.toUpperCase()}_HTTP_PORT`]
      ? Number(env[`${name.toUpperCase()}_HTTP_PORT`])
      : httpPort(ports.http, services.indexOf(name), replica);
  const nodes = plan.natsNodes > 1 ? natsNodes(plan.natsNodes, ports.nats) : [];
  const edge = (replica: number) => ({
    mx: ports.mx + replica,
    submission: ports.submission + replica,
    submissions: ports.submissions + replica,
  });
  const portUses: PortUse[] = [
    ...(env.NATS_URL
      ? []
      : nodes.length
        ? nodes.flatMap((n) => [
            { port: n.port, what: `NATS ${n.name}`, setting: "DEV_NATS_PORT or NATS_URL" },
            { port: n.clusterPort, what: `NATS ${n.name} routes`, setting: "DEV_NATS_PORT or NATS_URL" },
          ])
        : [{ port: ports.nats, what: "NATS", setting: "DEV_NATS_PORT or NATS_URL" }]),
    ...(env.REDIS_URL ? [] : [{ port: ports.redis, what: "Redis", setting: "DEV_REDIS_PORT or REDIS_URL" }]),
    ...(env.DNS_SERVERS !== undefined
      ? []
      : (["udp", "tcp"] as const).map((protocol) => ({
          port: ports.dns,
          what: "DNS",
          setting: "DEV_DNS_PORT or DNS_SERVERS",
          protocol,
        }))),
    ...processes.flatMap((p) =>
      p.service === "mx"
        ? [{ port: edge(p.replica).mx, what: `${p.name} SMTP`, setting: "MX_PORT" }]
        : p.service === "msa"
          ? [
              {
                port: edge(p.replica).submission,
                what: `${p.name} submission`,
                setting: "MSA_SUBMISSION_PORT",
              },
              {
                port: edge(p.replica).submissions,
                what: `${p.name} submissions`,
                setting: "MSA_SUBMISSIONS_PORT",
              },
            ]
          : [],
    ),
    ...processes.map((p) => ({
      port: httpPortOf(p.service, p.replica),
      what: `${p.name} health and metrics`,
      setting: `${p.service.toUpperCase()}_HTTP_PORT or DEV_HTTP_PORT_BASE`,
    })),
  ];
  await ensurePortsFree(portUses, host);

  // NATS and Redis, unless the environment points at running ones.
  let natsUrl = env.NATS_URL;
  if (!natsUrl && nodes.length) {
    // a store of its own: a single server's store cannot join a cluster as it is
    const dir = join(dataDir, "nats-cluster");
    for (const n of nodes) {
      const store = join(dir, n.name);
      await mkdir(store, { recursive: true });
      const conf = join(dir, `${n.name}.conf`);
      await writeFile(conf, natsNodeConfig(n, nodes, host, store));
      launch(`nats-${n.name}`, "nats-server", ["-c", conf], env, true);
    }
    for (const n of nodes) await waitPort(n.port, 10_000);
    natsUrl = nodes.map((n) => `nats://${host}:${n.port}`).join(",");
  }
  if (!natsUrl) {
    const store = join(dataDir, "nats");
    await mkdir(store, { recursive: true });
    launch("nats", "nats-server", ["-js", "-sd", store, "-a", host, "-p", String(ports.nats)], env, true);
    await waitPort(ports.nats, 10_000);
    natsUrl = `nats://${host}:${ports.nats}`;
  }
  let redisUrl = env.REDIS_URL;
  if (!redisUrl) {
    const dir = join(dataDir, "redis");
    await mkdir(dir, { recursive: true });
    launch(
      "redis",
      "redis-server",
      [
        "--port",
        String(ports.redis),
        "--bind",
        host,
        "--dir",
        dir,
        "--appendonly",
        "yes",
        "--save",
        "",
        "--protected-mode",
        "no",
      ],
      env,
      true,
    );
    await waitPort(ports.redis, 10_000);
    redisUrl = `redis://${host}:${ports.redis}`;
  }

  // DNS for the development domain (SPF, DKIM, DMARC), unless DNS_SERVERS is set; other names go
  // to the system's resolvers, and fail temporarily (SERVFAIL) when none answers.
  let dnsServers = env.DNS_SERVERS;
  let dnsNote = "";
  if (dnsServers === undefined) {
    const dkimTxt = await readFile(join(dataDir, "dkim", "example.test.mail.dns.txt"), "utf8").catch(
      () => "",
    );
    const dkimValue = /"(.*)"/.exec(dkimTxt)?.[1];
    const dns = await startDevDns({ host, port: ports.dns, ...(dkimValue ? { dkimValue } : {}) });
    dnsServers = dns.server.address;
    dnsNote = ` (example.test; other names via ${dns.upstream.join(", ") || "nothing: SERVFAIL"})`;
  }

  const maildirRoot = env.MAILDIR_ROOT ?? join(dataDir, "mail");
  const serviceEnv = (name: Name, replica: number): NodeJS.ProcessEnv => ({
    MAIL_HOSTNAME: "mail.example.test",
    LOG_LEVEL: "info",
    HTTP_HOST: host,
    MX_HOST: host,
    MSA_HOST: host,
    MAILDIR_ROOT: maildirRoot,
    SMTP_BLOCK_LOCAL_ADDRESSES: "false",
    // every stream, consumer and the body bucket on 3 of the cluster's nodes
    ...(nodes.length ? { JS_REPLICAS: String(Math.min(3, nodes.length)) } : {}),
    ...env,
    // consecutive ports for replicas of mx and msa (MX_PORT and the like move the first)
    MX_PORT: String(edge(replica).mx),
    MSA_SUBMISSION_PORT: String(edge(replica).submission),
    MSA_SUBMISSIONS_PORT: String(edge(replica).submissions),
    // these are set by npm start itself
    NATS_URL: natsUrl,
    REDIS_URL: redisUrl,
    DNS_SERVERS: dnsServers,
    DIRECTORY_FILE: directoryFile,
    TLS_CERT_FILE: certFile,
    TLS_KEY_FILE: keyFile,
    HTTP_PORT: String(httpPortOf(name, replica)),
  });
  const httpPorts = new Map<string, number>();
  for (const p of processes) {
    const e = serviceEnv(p.service, p.replica);
    httpPorts.set(p.name, Number(e.HTTP_PORT));
    launch(p.name, process.execPath, [join(root, "services", p.service, "src", "main.ts")], e);
  }

  // Ready when every /readyz answers 200.
  const readyWithinS = processes.length > services.length || nodes.length ? 120 : 60;
  const deadline = Date.now() + readyWithinS * 1000;
  for (const { name } of processes) {
    for (;;) {
      const ok = await fetch(`http://${host}:${httpPorts.get(name)}/readyz`)
        .then((r) => r.status === 200)
        .catch(() => false);
      if (ok) break;
      if (Date.now() > deadline) {
        say(
          color(
            31,
            `${name} did not become ready within ${readyWithinS} s; see ${rel(join(dataDir, "logs", `${name}.log`))}`,
          ),
        );
        await stopAll(1);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  const lines = [
    "",
    color(32, "mailpipe is running on loopback (development mode)."),
    "",
    ...processes
      .filter((p) => p.service === "mx")
      .map((p) => `  ${p.name.padEnd(4)} inbound SMTP            ${host}:${edge(p.replica).mx} (STARTTLS)`),
    ...processes
      .filter((p) => p.service === "msa")
      .map(
        (p) =>
          `  ${p.name.padEnd(4)} submission              ${host}:${edge(p.replica).submission} (STARTTLS + AUTH), ${host}:${edge(p.replica).submissions} (TLS + AUTH)`,
      ),
    `  NATS ${natsUrl}   Redis ${redisUrl}   DNS ${dnsServers || "(system)"}${dnsNote}`,
    ...(nodes.length
      ? [
          `  NATS cluster                 ${nodes.length} nodes (${nodes.map((n) => n.name).join(", ")}), streams with ${Math.min(3, nodes.length)} replicas; store ${rel(join(dataDir, "nats-cluster"))}`,
        ]
      : []),
    `  health and metrics           ${processes.map((p) => `${p.name} http://${host}:${httpPorts.get(p.name)}/metrics`).join(", ")}`,
    `  data                         ${rel(dataDir)} (JetStream store, Redis, mail, logs)`,
    "",
    "  Development users (DEVELOPMENT ONLY, the passwords are public):",
    "    alice@example.test / alice-dev-password     bob@example.test / bob-dev-password",
    "",
  ];
  if (services.includes("mx")) {
    lines.push(
      "  Send a first message (in another terminal):",
      `    swaks --server ${host}:${ports.mx} --from someone@elsewhere.test --to alice@example.test --header "Subject: first message"`,
    );
  }
  if (services.includes("msa")) {
    lines.push(
      "  Or submit as alice, like a mail client would:",
      `    swaks --server ${host}:${ports.submission} --tls --auth-user alice@example.test --auth-password alice-dev-password --from alice@example.test --to bob@example.test`,
    );
  }
  lines.push(
    "  Read it:",
    `    ls ${rel(join(maildirRoot, "example.test", "alice", "Maildir", "new"))}/ && cat ${rel(join(maildirRoot, "example.test", "alice", "Maildir", "new"))}/*`,
    "",
    "  Ctrl-C stops everything.",
    "",
  );
  process.stdout.write(`${lines.join("\n")}\n`);
}

main().catch(async (err) => {
  say(color(31, `could not start: ${(err as Error).message}`));
  await stopAll(1);
});
