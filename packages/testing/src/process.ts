import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { type Exit, exitOf, LineBuffer, terminate, track } from "./children.ts";

/** The monorepo root: this file lives in packages/testing/src. */
export const repoRoot: string = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");

/**
 * A TCP port that was free on `host` a moment ago. Another process can still take it before the
 * caller binds it; the server starters retry on "address in use" for that reason.
 */
export function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once("error", reject);
    server.listen({ host, port: 0, exclusive: true }, () => {
      const address = server.address();
      server.close(() => {
        if (address && typeof address === "object") resolve(address.port);
        else reject(new Error(`could not read the port bound on ${host}`));
      });
    });
  });
}

export interface TempDir {
  path: string;
  remove(): Promise<void>;
}

export async function tempDir(prefix: string): Promise<TempDir> {
  const dir = await mkdtemp(path.join(os.tmpdir(), `${prefix.replace(/[^\w.-]/g, "-")}-`));
  return { path: dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

export interface WaitForOptions {
  /** Default 10 000. */
  timeoutMs?: number;
  /** Default 50. */
  intervalMs?: number;
  /** What was being waited for; the timeout error starts with it. */
  message?: string;
}

/**
 * Polls `fn` until it returns something other than `false`, `null` or `undefined` without throwing,
 * and returns that value. Throws after `timeoutMs` with `message` and the last error or value.
 * (For assertion callbacks that return nothing, use vitest's `vi.waitFor`.)
 */
export async function waitFor<T>(
  fn: () => T | Promise<T>,
  options: WaitForOptions = {},
): Promise<Exclude<T, false | null | undefined>> {
  const { timeoutMs = 10_000, intervalMs = 50, message = "condition not met" } = options;
  const deadline = Date.now() + timeoutMs;
  let last: string;
  for (;;) {
    try {
      const value = await fn();
      if (value !== false && value !== null && value !== undefined) {
        return value as Exclude<T, false | null | undefined>;
      }
      last = `last value: ${String(value)}`;
    } catch (err) {
      last = `last error: ${err instanceof Error ? err.message : String(err)}`;
    }
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`${message} (timed out after ${timeoutMs} ms; ${last})`);
    await new Promise((resolve) => setTimeout(resolve, Math.min(intervalMs, left)));
  }
}

export interface StartServiceOptions {
  /** Merged over process.env. HTTP_HOST defaults to 127.0.0.1 and HTTP_PORT to a free port. */
  env?: Record<string, string | undefined>;
  cwd?: string;
  /** Default 30 000. */
  readyTimeoutMs?: number;
  /** Return as soon as the process is spawned instead of waiting for /readyz (default true). */
  waitReady?: boolean;
  /** Script to run instead of services/<name>/src/main.ts. */
  entry?: string;
  /** Extra node flags placed before the script, e.g. ["--enable-source-maps"]. */
  nodeArgs?: string[];
}

export type LogMatch = string | RegExp | ((line: string) => boolean);

export interface ServiceHandle {
  name: string;
  pid: number;
  httpPort: number;
  /** Every stdout and stderr line so far (pino writes JSON lines); grows while the service runs. */
  logs: string[];
  url(pathname: string): string;
  /** Resolves with the first log line (past or future) matching `match`; throws after `timeoutMs`. */
  waitForLog(match: LogMatch, timeoutMs?: number): Promise<string>;
  /** Sends `signal` (SIGTERM), SIGKILLs after `timeoutMs` (15 000); resolves with the exit code, null if killed. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<number | null>;
  kill(): Promise<void>;
  exited: Promise<Exit>;
}

/**
 * Runs `node services/<name>/src/main.ts` (or `entry`) and waits until GET /readyz answers 200.
 * The child is killed if the test process exits first.
 */
export async function startService(name: string, options: StartServiceOptions = {}): Promise<ServiceHandle> {
  const { readyTimeoutMs = 30_000 } = options;
  const entry = options.entry ?? path.join(repoRoot, "services", name, "src", "main.ts");
  const env: Record<string, string | undefined> = { ...process.env, HTTP_HOST: "127.0.0.1", ...options.env };
  if (!env["HTTP_PORT"]) env["HTTP_PORT"] = String(await freePort());
  const httpPort = Number(env["HTTP_PORT"]);
  // A service listening on every interface is still reached over loopback.
  const httpHost = !env["HTTP_HOST"] || env["HTTP_HOST"] === "0.0.0.0" ? "127.0.0.1" : env["HTTP_HOST"];
  const base = `http://${httpHost.includes(":") ? `[${httpHost}]` : httpHost}:${httpPort}`;

  const child = spawn(process.execPath, [...(options.nodeArgs ?? []), entry], {
    cwd: options.cwd ?? repoRoot,
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  await new Promise<void>((resolve, reject) => {
    child.once("spawn", resolve);
    child.once("error", reject);
  });
  track(child);

  const logs: string[] = [];
  const logWaiters = new Set<(line: string) => void>();
  const onLine = (line: string) => {
    logs.push(line);
    for (const waiter of logWaiters) waiter(line);
  };
  // One splitter per stream, so a line is never glued to half a line of the other stream.
  for (const stream of [child.stdout, child.stderr]) {
    const lines = new LineBuffer(0, onLine); // keeps nothing itself, only splits and forwards
    stream.on("data", (chunk: Buffer) => lines.push(chunk));
    stream.on("end", () => lines.end());
  }
  const closed = new Promise<void>((resolve) => child.once("close", () => resolve()));
  const exited = exitOf(child);

  const handle: ServiceHandle = {
    name,
    pid: child.pid ?? -1,
    httpPort,
    logs,
    url: (pathname) => `${base}${pathname.startsWith("/") ? "" : "/"}${pathname}`,
    waitForLog(match, timeoutMs = 10_000) {
      const test =
        typeof match === "function"
          ? match
          : typeof match === "string"
            ? (line: string) => line.includes(match)
            : (line: string) => match.test(line);
      const seen = logs.find(test);
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          logWaiters.delete(waiter);
          reject(new Error(`${name}: no log line matched ${String(match)} within ${timeoutMs} ms`));
        }, timeoutMs);
        const waiter = (line: string) => {
          if (!test(line)) return;
          clearTimeout(timer);
          logWaiters.delete(waiter);
          resolve(line);
        };
        logWaiters.add(waiter);
      });
    },
    async stop(signal = "SIGTERM", timeoutMs = 15_000) {
      return (await terminate(child, signal, timeoutMs)).code;
    },
    async kill() {
      await terminate(child, "SIGKILL", 0);
    },
    exited,
  };

  if (options.waitReady === false) return handle;
  let exitedEarly: Exit | undefined;
  void exited.then((exit) => {
    exitedEarly = exit;
  });
  try {
    const outcome = await waitFor(
      async () => {
        if (exitedEarly) return "exited";
        const res = await fetch(handle.url("/readyz"), { signal: AbortSignal.timeout(1_000) });
        await res.body?.cancel();
        if (res.status !== 200) throw new Error(`/readyz answered ${res.status}`);
        return "ready";
      },
      { timeoutMs: readyTimeoutMs, intervalMs: 100, message: `service ${name} did not become ready` },
    );
    if (outcome === "exited") {
      throw new Error(
        `service ${name} exited (code ${exitedEarly?.code}, signal ${exitedEarly?.signal}) before it was ready`,
      );
    }
  } catch (err) {
    await terminate(child, "SIGKILL", 0);
    // The cause is usually in the service's last lines, which may still be in the pipes.
    await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 2_000))]);
    throw new Error(
      `${(err as Error).message}\n--- last log lines of ${name} ---\n${logs.slice(-30).join("\n")}`,
    );
  }
  return handle;
}
