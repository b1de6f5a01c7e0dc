// A real 3-node (or N-node) nats-server JetStream cluster on loopback: routes between the nodes,
// file storage, one store directory per node. Each node can be SIGKILLed and restarted on its store.
import { type ChildProcess, spawn } from "node:child_process";
import { mkdir, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { exitOf, LineBuffer, terminate, track, trackDir, untrackDir } from "./children.ts";
import { freePort, tempDir } from "./process.ts";
import { findBinary } from "./servers.ts";

const HOST = "127.0.0.1";
const STOP_GRACE_MS = 5_000;

export interface NatsNodeHandle {
  /** n1, n2, … (the server_name) */
  readonly name: string;
  /** nats://127.0.0.1:PORT of this node alone */
  readonly url: string;
  readonly port: number;
  /** the route port the other nodes connect to */
  readonly clusterPort: number;
  /** http://127.0.0.1:PORT (/healthz, /jsz, /varz) */
  readonly monitorUrl: string;
  /** changes on restart(); undefined while the node is down */
  readonly pid: number | undefined;
  readonly running: boolean;
  readonly storeDir: string;
  /** SIGKILL, as in a crash; the store stays for restart() */
  kill(): Promise<void>;
  /** SIGTERM (SIGKILL after 5 s) and wait for the exit; the store stays */
  stop(): Promise<void>;
  /** starts the node again (stopping it first if it runs) on the same ports and store, and waits until it is healthy */
  restart(): Promise<void>;
  /** resolves once /healthz says the node serves JetStream (it knows the meta leader and is current) */
  waitHealthy(timeoutMs?: number): Promise<void>;
}

export interface NatsClusterHandle {
  /** every node's URL, comma-separated: what NATS_URL takes */
  readonly url: string;
  readonly nodes: readonly NatsNodeHandle[];
  /** the node names and which one leads the JetStream meta group (read from a running node's /jsz) */
  metaLeader(): Promise<string | undefined>;
  /** waits until every running node is healthy */
  waitHealthy(timeoutMs?: number): Promise<void>;
  /** stops every node and removes the store directories it created */
  stop(): Promise<void>;
}

export interface StartNatsClusterOptions {
  /** default 3 */
  size?: number;
  /** a parent directory for the nodes' stores (`<dir>/n1`, …); default a temp dir removed on stop() */
  storeDir?: string;
  /** cluster name; default "mailpipe" */
  name?: string;
  /** how long start and restart wait for the cluster to be healthy; default 30 s */
  readyTimeoutMs?: number;
}

function nodeConfig(o: {
  name: string;
  cluster: string;
  port: number;
  clusterPort: number;
  monitorPort: number;
  storeDir: string;
  routes: number[];
}): string {
  return [
    `server_name: ${o.name}`,
    `listen: "${HOST}:${o.port}"`,
    `http: "${HOST}:${o.monitorPort}"`,
    // 8 MiB as for the single test server (Object Store chunks and small bodies in one message)
    "max_payload: 8MB",
    `jetstream { store_dir: ${JSON.stringify(o.storeDir)} }`,
    "cluster {",
    `  name: ${o.cluster}`,
    `  listen: "${HOST}:${o.clusterPort}"`,
    `  routes: [${o.routes.map((p) => `"nats-route://${HOST}:${p}"`).join(", ")}]`,
    "}",
    "",
  ].join("\n");
}

async function healthy(monitorUrl: string): Promise<boolean> {
  try {
    const res = await fetch(`${monitorUrl}/healthz`, { signal: AbortSignal.timeout(1_000) });
    if (!res.ok) return false;
    const body = (await res.json()) as { status?: string };
    return body.status === "ok";
  } catch {
    return false;
  }
}

/**
 * Starts `size` nats-servers (default 3) routed into one JetStream cluster on 127.0.0.1 and waits
 * until every node is healthy (a meta leader is elected and each node is current). Needs the
 * nats-server binary (Debian's 2.9.10 works); there is no container fallback for a cluster.
 */
export async function startNatsCluster(options: StartNatsClusterOptions = {}): Promise<NatsClusterHandle> {
  const binary = findBinary("nats-server");
  if (!binary) throw new Error("nats-server is not on PATH: apt-get install nats-server");
  const size = options.size ?? 3;
  const readyTimeoutMs = options.readyTimeoutMs ?? 30_000;
  const owned: string[] = [];
  const conf = (await tempDir("mailpipe-nats-cluster-conf")).path;
  trackDir(conf);
  owned.push(conf);
  let root = options.storeDir;
  if (root) await mkdir(root, { recursive: true });
  else {
    root = (await tempDir("mailpipe-nats-cluster")).path;
    trackDir(root);
    owned.push(root);
  }
  const ports = await Promise.all(
    Array.from({ length: size }, async () => ({
      port: await freePort(HOST),
      clusterPort: await freePort(HOST),
      monitorPort: await freePort(HOST),
    })),
  );
  const nodes: Node[] = [];
  for (let i = 0; i < size; i++) {
    const name = `n${i + 1}`;
    const storeDir = path.join(root, name);
    await mkdir(storeDir, { recursive: true });
    const file = path.join(conf, `${name}.conf`);
    await writeFile(
      file,
      nodeConfig({
        name,
        cluster: options.name ?? "mailpipe",
        ...ports[i]!,
        storeDir,
        routes: ports.filter((_, j) => j !== i).map((p) => p.clusterPort),
      }),
    );
    nodes.push(new Node(binary, name, file, storeDir, ports[i]!, readyTimeoutMs));
  }
  const cluster: NatsClusterHandle = {
    url: nodes.map((n) => n.url).join(","),
    nodes,
    async metaLeader() {
      for (const n of nodes) {
        if (!n.running) continue;
        try {
          const jsz = (await fetch(`${n.monitorUrl}/jsz`, { signal: AbortSignal.timeout(1_000) }).then((r) =>
            r.json(),
          )) as { meta_cluster?: { leader?: string } };
          if (jsz.meta_cluster?.leader) return jsz.meta_cluster.leader;
        } catch {
          // try the next node
        }
      }
      return undefined;
    },
    async waitHealthy(timeoutMs = readyTimeoutMs) {
      await Promise.all(nodes.filter((n) => n.running).map((n) => n.waitHealthy(timeoutMs)));
    },
    async stop() {
      await Promise.all(nodes.map((n) => n.stop()));
      for (const dir of owned) {
        await rm(dir, { recursive: true, force: true, maxRetries: 3 });
        untrackDir(dir);
      }
    },
  };
  try {
    await Promise.all(nodes.map((n) => n.start()));
    await cluster.waitHealthy();
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return cluster;
}

class Node implements NatsNodeHandle {
  readonly name: string;
  readonly port: number;
  readonly clusterPort: number;
  readonly monitorUrl: string;
  readonly storeDir: string;
  readonly #binary: string;
  readonly #conf: string;
  readonly #readyTimeoutMs: number;
  #child: ChildProcess | undefined;
  readonly #output = new LineBuffer(40);

  constructor(
    binary: string,
    name: string,
    conf: string,
    storeDir: string,
    ports: { port: number; clusterPort: number; monitorPort: number },
    readyTimeoutMs: number,
  ) {
    this.#binary = binary;
    this.name = name;
    this.#conf = conf;
    this.storeDir = storeDir;
    this.port = ports.port;
    this.clusterPort = ports.clusterPort;
    this.monitorUrl = `http://${HOST}:${ports.monitorPort}`;
    this.#readyTimeoutMs = readyTimeoutMs;
  }

  get url(): string {
    return `nats://${HOST}:${this.port}`;
  }

  get pid(): number | undefined {
    return this.running ? this.#child?.pid : undefined;
  }

  get running(): boolean {
    const c = this.#child;
    return !!c && c.exitCode === null && c.signalCode === null;
  }

  async start(): Promise<void> {
    const child = spawn(this.#binary, ["-c", this.#conf], { stdio: ["ignore", "pipe", "pipe"] });
    await new Promise<void>((resolve, reject) => {
      child.once("spawn", resolve);
      child.once("error", reject);
    });
    track(child);
    child.stdout?.on("data", (chunk: Buffer) => this.#output.push(chunk));
    child.stderr?.on("data", (chunk: Buffer) => this.#output.push(chunk));
    this.#child = child;
  }

  async waitHealthy(timeoutMs = this.#readyTimeoutMs): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (!this.running) {
        throw new Error(
          `nats-server ${this.name} on ${HOST}:${this.port} exited\n--- output ---\n${this.#output.tail(20)}`,
        );
      }
      if (await healthy(this.monitorUrl)) return;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    throw new Error(
      `nats-server ${this.name} on ${HOST}:${this.port} not healthy after ${timeoutMs} ms\n--- output ---\n${this.#output.tail(20)}`,
    );
  }

  async kill(): Promise<void> {
    if (this.#child) await terminate(this.#child, "SIGKILL", 0);
  }

  async stop(): Promise<void> {
    if (this.#child) await terminate(this.#child, "SIGTERM", STOP_GRACE_MS);
  }

  async restart(): Promise<void> {
    await this.stop();
    // the old listeners are gone once the process exited; a lagging kernel gets a few tries
    for (let attempt = 1; ; attempt++) {
      await this.start();
      const child = this.#child!;
      const exited = await Promise.race([
        exitOf(child).then(() => true),
        new Promise<false>((r) => setTimeout(() => r(false), 300)),
      ]);
      if (!exited) break;
      if (attempt >= 5 || !/address already in use/i.test(this.#output.tail(20))) {
        throw new Error(`nats-server ${this.name} did not restart\n--- output ---\n${this.#output.tail(20)}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    await this.waitHealthy();
  }
}
