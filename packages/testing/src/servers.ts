// Real nats-server and redis-server for tests: local binaries, or containers when those are missing.
import { type ChildProcess, spawn } from "node:child_process";
import { accessSync, constants, statSync } from "node:fs";
import { mkdir, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { exitOf, LineBuffer, terminate, track, trackDir, untrackDir } from "./children.ts";
import { freePort, tempDir } from "./process.ts";

const HOST = "127.0.0.1";
const READY_TIMEOUT_MS = 10_000;
const STOP_GRACE_MS = 5_000;

export interface ServerHandle {
  /** nats://127.0.0.1:PORT or redis://127.0.0.1:PORT */
  readonly url: string;
  readonly host: string;
  readonly port: number;
  /** The server's process id; changes on restart(); undefined when it runs in a container. */
  readonly pid: number | undefined;
  /** Where the server keeps its data (a path inside the container in container mode). */
  readonly dataDir: string;
  /** SIGTERM, SIGKILL after 5 s, waits for the exit; removes the data dir unless the caller gave it. */
  stop(): Promise<void>;
  /** SIGKILL, as in a crash; the data dir stays so restart() can recover from it. */
  kill(): Promise<void>;
  /** Stops (if running) and starts again on the same port with the same data. */
  restart(): Promise<void>;
}

export interface NatsHandle extends ServerHandle {
  /** http://127.0.0.1:PORT of the monitoring endpoint when `monitor` was set. */
  readonly monitorUrl: string | undefined;
}

export interface StartNatsOptions {
  /** JetStream store directory; default a temp dir removed on stop(). */
  storeDir?: string;
  port?: number;
  /** Also open the HTTP monitoring port (/varz, /jsz, /healthz). */
  monitor?: boolean;
}

export interface StartRedisOptions {
  /** Working directory for the AOF; default a temp dir removed on stop(). */
  dir?: string;
  port?: number;
  /** Default true. */
  appendonly?: boolean;
  /** AOF fsync policy: `everysec` (Redis's default) or `always` (what the manifests run) */
  appendfsync?: "always" | "everysec";
  /** Start as a replica of this master (`--replicaof`): Redis replication, asynchronous. */
  replicaof?: Pick<ServerHandle, "host" | "port">;
}

export type ServerMode = "local" | "container";

export interface ServerModeInput {
  binary: string;
  binaryFound: boolean;
  runtimeAvailable: boolean;
  /** The value of MAILPIPE_TEST_SERVERS: "local", "container", or empty for automatic. */
  preference?: string | undefined;
}

const INSTALL_HINT = "apt-get install nats-server redis-server";

/** Local binaries when present; containers only when the binary is missing or asked for. Throws advice otherwise. */
export function chooseServerMode(input: ServerModeInput): ServerMode {
  const { binary, binaryFound, runtimeAvailable } = input;
  const preference = input.preference?.trim().toLowerCase() || "auto";
  if (preference === "container") {
    if (runtimeAvailable) return "container";
    throw new Error(
      "MAILPIPE_TEST_SERVERS=container but no container runtime answered: start Docker or Podman, " +
        `or unset it and ${INSTALL_HINT}`,
    );
  }
  if (preference === "local") {
    if (binaryFound) return "local";
    throw new Error(`MAILPIPE_TEST_SERVERS=local but ${binary} is not on PATH: ${INSTALL_HINT}`);
  }
  if (preference !== "auto") {
    throw new Error(`MAILPIPE_TEST_SERVERS must be "local" or "container", not "${input.preference}"`);
  }
  if (binaryFound) return "local";
  if (runtimeAvailable) return "container";
  throw new Error(`${binary} is not on PATH and no container runtime was found: ${INSTALL_HINT}`);
}

let runtimeProbe: Promise<boolean> | undefined;

/** Whether testcontainers finds Docker or Podman; bounded to 3 s and remembered for the process. */
export function detectContainerRuntime(): Promise<boolean> {
  runtimeProbe ??= (async () => {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), 3_000);
    });
    try {
      const probe = import("testcontainers").then(async ({ getContainerRuntimeClient }) => {
        await getContainerRuntimeClient();
        return true;
      });
      return await Promise.race([probe.catch(() => false), timeout]);
    } finally {
      clearTimeout(timer);
    }
  })();
  return runtimeProbe;
}

/** Absolute path of an executable on PATH (or in the sbin dirs Debian puts servers in). */
export function findBinary(name: string): string | undefined {
  const dirs = [
    ...(process.env["PATH"] ?? "").split(path.delimiter),
    "/usr/local/sbin",
    "/usr/sbin",
    "/sbin",
  ];
  for (const dir of dirs) {
    if (!dir) continue;
    const candidate = path.join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      if (statSync(candidate).isFile()) return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

async function decide(binary: string): Promise<{ mode: ServerMode; binaryPath: string | undefined }> {
  const binaryPath = findBinary(binary);
  const preference = process.env["MAILPIPE_TEST_SERVERS"];
  const wantsContainer = preference?.trim().toLowerCase() === "container";
  const runtimeAvailable = wantsContainer || !binaryPath ? await detectContainerRuntime() : false;
  return {
    mode: chooseServerMode({ binary, binaryFound: !!binaryPath, runtimeAvailable, preference }),
    binaryPath,
  };
}

// --- readiness probes ------------------------------------------------------------------------

/** Connects, optionally sends `send`, and resolves with the first line the server writes. */
function firstLine(host: string, port: number, send: string | undefined, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    let data = "";
    const done = (err: Error | undefined, line?: string) => {
      socket.destroy();
      if (err) reject(err);
      else resolve(line ?? "");
    };
    socket.setTimeout(timeoutMs, () => done(new Error(`no answer within ${timeoutMs} ms`)));
    socket.once("error", (err) => done(err));
    socket.once("connect", () => {
      if (send) socket.write(send);
    });
    socket.on("data", (chunk) => {
      data += chunk.toString();
      const end = data.indexOf("\r\n");
      if (end >= 0) done(undefined, data.slice(0, end));
    });
    socket.once("end", () =>
      done(new Error(`connection closed before a full line (got ${JSON.stringify(data)})`)),
    );
  });
}

async function natsReady(host: string, port: number): Promise<void> {
  const line = await firstLine(host, port, undefined, 1_000);
  if (!line.startsWith("INFO ")) throw new Error(`expected INFO, got ${JSON.stringify(line.slice(0, 80))}`);
}

async function redisReady(host: string, port: number): Promise<void> {
  // While an AOF loads, redis answers -LOADING; only +PONG means it serves commands.
  const line = await firstLine(host, port, "PING\r\n", 1_000);
  if (line !== "+PONG") throw new Error(`PING answered ${JSON.stringify(line)}`);
}

// --- local processes -----------------------------------------------------------------------

interface LocalSpec {
  name: string;
  binaryPath: string;
  args(port: number): string[];
  ready(host: string, port: number): Promise<void>;
}

/** Starts the process and waits until it serves; rejects with the output tail if it exits or stalls. */
async function launch(spec: LocalSpec, port: number): Promise<ChildProcess> {
  const output = new LineBuffer(40);
  const child = spawn(spec.binaryPath, spec.args(port), { stdio: ["ignore", "pipe", "pipe"] });
  await new Promise<void>((resolve, reject) => {
    child.once("spawn", resolve);
    child.once("error", reject);
  });
  track(child);
  child.stdout?.on("data", (chunk: Buffer) => output.push(chunk));
  child.stderr?.on("data", (chunk: Buffer) => output.push(chunk));
  let exited = false;
  const exit = exitOf(child).then(() => {
    exited = true;
    throw new Error("exited");
  });
  exit.catch(() => undefined);
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let lastError = "";
  while (!exited && Date.now() < deadline) {
    try {
      // a probe can stall on whoever else holds the port; the exit is news sooner
      await Promise.race([spec.ready(HOST, port), exit]);
      return child;
    } catch (err) {
      lastError = (err as Error).message;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  await terminate(child, "SIGKILL", 0);
  // give the pipes a moment to deliver the last words of a crashed server
  await new Promise((resolve) => setTimeout(resolve, 50));
  output.end();
  const why = exited
    ? `exited (code ${child.exitCode}, signal ${child.signalCode})`
    : `not ready after ${READY_TIMEOUT_MS} ms (${lastError})`;
  throw new PortError(
    `${spec.name} on ${HOST}:${port} ${why}\n--- ${spec.name} output ---\n${output.tail(20)}`,
    /address already in use/i.test(output.tail(40)),
  );
}

class PortError extends Error {
  readonly portInUse: boolean;
  constructor(message: string, portInUse: boolean) {
    super(message);
    this.portInUse = portInUse;
  }
}

async function localServer(
  spec: LocalSpec,
  scheme: string,
  fixedPort: number | undefined,
  dataDir: string,
  ownedDirs: string[],
  extra: Record<string, unknown> = {},
): Promise<ServerHandle> {
  let port = fixedPort ?? (await freePort(HOST));
  let child: ChildProcess;
  for (let attempt = 1; ; attempt++) {
    try {
      child = await launch(spec, port);
      break;
    } catch (err) {
      // freePort() cannot reserve the port; someone may have taken it since.
      if (!(err instanceof PortError && err.portInUse) || fixedPort !== undefined || attempt >= 3) {
        await removeDirs(ownedDirs);
        throw err;
      }
      port = await freePort(HOST);
    }
  }
  let stopped = false;
  return {
    ...extra,
    url: `${scheme}://${HOST}:${port}`,
    host: HOST,
    port,
    get pid() {
      return child.pid;
    },
    dataDir,
    async stop() {
      await terminate(child, "SIGTERM", STOP_GRACE_MS);
      if (!stopped) {
        stopped = true;
        await removeDirs(ownedDirs);
      }
    },
    async kill() {
      await terminate(child, "SIGKILL", 0);
    },
    async restart() {
      if (stopped) throw new Error(`${spec.name} was stopped; start a new one`);
      await terminate(child, "SIGTERM", STOP_GRACE_MS);
      // The old listener is gone once the process exited, but retry briefly in case the kernel lags.
      for (let attempt = 1; ; attempt++) {
        try {
          child = await launch(spec, port);
          return;
        } catch (err) {
          if (!(err instanceof PortError && err.portInUse) || attempt >= 5) throw err;
          await new Promise((resolve) => setTimeout(resolve, 200));
        }
      }
    },
  };
}

async function removeDirs(dirs: string[]): Promise<void> {
  for (const dir of dirs) {
    await rm(dir, { recursive: true, force: true, maxRetries: 3 });
    untrackDir(dir);
  }
}

async function ownedTemp(prefix: string): Promise<string> {
  const dir = await tempDir(prefix);
  trackDir(dir.path);
  return dir.path;
}

// --- public starters --------------------------------------------------------------------------

// 8 MiB lets Object Store chunks and whole small bodies through; the server default is 1 MiB.
const NATS_CONFIG = "max_payload: 8MB\n";

export async function startNats(options: StartNatsOptions = {}): Promise<NatsHandle> {
  const { mode, binaryPath } = await decide("nats-server");
  if (mode === "container") return containerNats(options);

  const owned: string[] = [];
  const confDir = await ownedTemp("mailpipe-nats-conf");
  owned.push(confDir);
  let storeDir = options.storeDir;
  if (storeDir) await mkdir(storeDir, { recursive: true });
  else {
    storeDir = await ownedTemp("mailpipe-nats");
    owned.push(storeDir);
  }
  const confFile = path.join(confDir, "nats.conf");
  await writeFile(confFile, NATS_CONFIG);
  const monitorPort = options.monitor ? await freePort(HOST) : undefined;
  const store = storeDir;
  const spec: LocalSpec = {
    name: "nats-server",
    binaryPath: binaryPath!,
    args: (port) => [
      "-c",
      confFile,
      "-a",
      HOST,
      "-p",
      String(port),
      "-js",
      "-sd",
      store,
      ...(monitorPort ? ["-m", String(monitorPort)] : []),
    ],
    ready: natsReady,
  };
  const monitorUrl = monitorPort ? `http://${HOST}:${monitorPort}` : undefined;
  return (await localServer(spec, "nats", options.port, store, owned, { monitorUrl })) as NatsHandle;
}

export async function startRedis(options: StartRedisOptions = {}): Promise<ServerHandle> {
  const { mode, binaryPath } = await decide("redis-server");
  if (mode === "container") return containerRedis(options);

  const owned: string[] = [];
  let dir = options.dir;
  if (dir) await mkdir(dir, { recursive: true });
  else {
    dir = await ownedTemp("mailpipe-redis");
    owned.push(dir);
  }
  const workDir = dir;
  const appendonly = options.appendonly ?? true;
  const spec: LocalSpec = {
    name: "redis-server",
    binaryPath: binaryPath!,
    args: (port) => [
      "--port",
      String(port),
      "--bind",
      HOST,
      "--dir",
      workDir,
      "--appendonly",
      appendonly ? "yes" : "no",
      "--appendfsync",
      options.appendfsync ?? "everysec",
      ...(options.replicaof ? ["--replicaof", options.replicaof.host, String(options.replicaof.port)] : []),
      "--save",
      "",
      "--protected-mode",
      "no",
      "--daemonize",
      "no",
    ],
    ready: redisReady,
  };
  return localServer(spec, "redis", options.port, workDir, owned);
}

export interface StartRedisSentinelOptions {
  /** The name the Sentinel knows the master by; default "mymaster" (REDIS_SENTINEL_NAME's default). */
  name?: string;
}

export interface RedisSentinelHandle extends ServerHandle {
  /** The master's name in this Sentinel. */
  readonly masterName: string;
}

/**
 * A real Redis Sentinel (`redis-server --sentinel`) monitoring `master`, ready once it names the
 * master. Local binary only: Debian's redis-server package has Sentinel built in.
 */
export async function startRedisSentinel(
  master: Pick<ServerHandle, "host" | "port">,
  options: StartRedisSentinelOptions = {},
): Promise<RedisSentinelHandle> {
  const binaryPath = findBinary("redis-server");
  if (!binaryPath) throw new Error(`redis-server is not on PATH (a Sentinel runs it): ${INSTALL_HINT}`);
  const masterName = options.name ?? "mymaster";
  // Sentinel rewrites its config file, so the file lives in a directory of its own
  const dir = await ownedTemp("mailpipe-sentinel");
  const confFile = path.join(dir, "sentinel.conf");
  await writeFile(
    confFile,
    [
      `bind ${HOST}`,
      `dir ${dir}`,
      `sentinel monitor ${masterName} ${master.host} ${master.port} 1`,
      `sentinel down-after-milliseconds ${masterName} 1000`,
      `sentinel failover-timeout ${masterName} 5000`,
      "",
    ].join("\n"),
  );
  const spec: LocalSpec = {
    name: "redis-server --sentinel",
    binaryPath,
    args: (port) => [confFile, "--sentinel", "--port", String(port)],
    ready: async (host, port) => {
      // the reply is "*2" (host and port follow) once it knows the master, "*-1" before
      const line = await firstLine(host, port, `SENTINEL get-master-addr-by-name ${masterName}\r\n`, 1_000);
      if (line !== "*2") throw new Error(`the Sentinel does not name ${masterName} yet (${line})`);
    },
  };
  return (await localServer(spec, "redis", undefined, dir, [dir], { masterName })) as RedisSentinelHandle;
}

// --- containers (used only where the binaries are missing; not exercised on CI) ---------------

async function containerServer(
  image: string,
  containerPort: number,
  command: string[],
  files: { content: string; target: string }[],
  scheme: string,
  dataDir: string,
  fixedPort: number | undefined,
  ready: (host: string, port: number) => Promise<void>,
): Promise<ServerHandle> {
  const { GenericContainer } = await import("testcontainers");
  // A fixed host port survives `docker restart`; a random mapping would change on restart.
  const port = fixedPort ?? (await freePort(HOST));
  const container = await new GenericContainer(image)
    .withCommand(command)
    .withCopyContentToContainer(files)
    .withExposedPorts({ container: containerPort, host: port })
    .withStartupTimeout(60_000)
    .start();
  const host = container.getHost();
  const waitReady = async () => {
    const deadline = Date.now() + 30_000;
    for (;;) {
      try {
        return await ready(host, port);
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`${image} is not ready: ${(err as Error).message}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  };
  await waitReady();
  return {
    url: `${scheme}://${host}:${port}`,
    host,
    port,
    pid: undefined,
    dataDir,
    async stop() {
      await container.stop({ timeout: STOP_GRACE_MS / 1000 });
    },
    async kill() {
      await container.stop({ timeout: 0, remove: false });
    },
    async restart() {
      await container.restart({ timeout: STOP_GRACE_MS / 1000 });
      await waitReady();
    },
  };
}

async function containerNats(options: StartNatsOptions): Promise<NatsHandle> {
  const handle = await containerServer(
    "nats:2.10-alpine",
    4222,
    ["-c", "/etc/nats/mailpipe.conf", "-js", "-sd", "/data"],
    [{ content: NATS_CONFIG, target: "/etc/nats/mailpipe.conf" }],
    "nats",
    "/data",
    options.port,
    natsReady,
  );
  return Object.assign(handle, { monitorUrl: undefined });
}

async function containerRedis(options: StartRedisOptions): Promise<ServerHandle> {
  if (options.replicaof) throw new Error("a Redis replica runs only from the local redis-server binary");
  const appendonly = options.appendonly ?? true;
  return containerServer(
    "redis:7-alpine",
    6379,
    ["redis-server", "--appendonly", appendonly ? "yes" : "no", "--save", "", "--dir", "/data"],
    [],
    "redis",
    "/data",
    options.port,
    redisReady,
  );
}
