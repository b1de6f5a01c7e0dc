// `npm start` leaves nothing behind: closing its terminal (SIGHUP) stops every process it started,
// a supervisor killed outright (SIGKILL) takes its children with it, and the next `npm start` on the
// same folder and ports starts; a port held by someone else is named with its holder.
import { type ChildProcess, spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { join } from "node:path";
import { freePort, repoRoot, type TempDir, tempDir, waitFor } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { listenersOf, type PidFileContent } from "../../scripts/dev-lifecycle.ts";

interface Run {
  child: ChildProcess;
  output(): string;
  exited: Promise<{ code: number | null; signal: string | null }>;
}

let data: TempDir;
let env: NodeJS.ProcessEnv;
let ports: number[] = [];
const runs: Run[] = [];

/** `npm start` as a newcomer runs it, in a session of its own like a terminal's. */
function npmStart(): Run {
  const child = spawn("npm", ["start"], {
    cwd: repoRoot,
    env,
    detached: true,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout?.on("data", (d) => {
    out += d.toString();
  });
  child.stderr?.on("data", (d) => {
    out += d.toString();
  });
  const exited = new Promise<{ code: number | null; signal: string | null }>((r) =>
    child.once("exit", (code, signal) => r({ code, signal })),
  );
  const run = { child, output: () => out, exited };
  runs.push(run);
  return run;
}

async function ready(run: Run): Promise<void> {
  await waitFor(() => run.output().includes("Ctrl-C stops everything"), {
    timeoutMs: 120_000,
    message: "npm start did not say it was ready",
  }).catch((err) => {
    throw new Error(`${(err as Error).message}\n${run.output()}`);
  });
}

/**
 * Every live process started for this data folder: they carry it in their environment, except
 * redis-server, which writes its title over it; that one (and anything else) holds one of the ports.
 */
function processesOfThisStart(): { pid: number; cmd: string }[] {
  const marker = `MAILPIPE_DATA_DIR=${data.path}`;
  const listening = new Set(ports.flatMap((port) => listenersOf(port)));
  const found: { pid: number; cmd: string }[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const environ = readFileSync(`/proc/${entry}/environ`, "utf8").split("\0");
      if (!environ.includes(marker) && !listening.has(Number(entry))) continue;
      const cmd = readFileSync(`/proc/${entry}/cmdline`, "utf8").replaceAll("\0", " ").trim();
      if (cmd) found.push({ pid: Number(entry), cmd }); // a zombie has no command line: it is gone
    } catch {
      // gone meanwhile, or not ours to read
    }
  }
  return found;
}

async function allGone(what: string): Promise<void> {
  await waitFor(() => processesOfThisStart().length === 0, { timeoutMs: 60_000, message: what }).catch(
    (err: Error) => {
      const left = processesOfThisStart().map((p) => `${p.pid} ${p.cmd}`);
      throw new Error(`${err.message}; still running:\n${left.join("\n")}`);
    },
  );
}

const pidFile = () => JSON.parse(readFileSync(join(data.path, "npm-start.pids"), "utf8")) as PidFileContent;

beforeAll(async () => {
  data = await tempDir("npm-start-lifecycle");
  env = {
    ...process.env,
    MAILPIPE_DATA_DIR: data.path,
    DEV_NATS_PORT: String(await freePort()),
    DEV_REDIS_PORT: String(await freePort()),
    DEV_DNS_PORT: String(await freePort()),
    MX_PORT: String(await freePort()),
    MSA_SUBMISSION_PORT: String(await freePort()),
    MSA_SUBMISSIONS_PORT: String(await freePort()),
  };
  for (const s of ["MX", "MSA", "ROUTER", "DELIVERY", "MDA"])
    env[`${s}_HTTP_PORT`] = String(await freePort());
  ports = Object.entries(env)
    .filter(([k]) => k.endsWith("_PORT"))
    .map(([, v]) => Number(v));
});

/** Whatever a failed test left: every group it started, and every process of this data folder. */
function killAll(): void {
  for (const run of runs.splice(0)) {
    try {
      if (run.child.pid) process.kill(-run.child.pid, "SIGKILL");
    } catch {
      // the group is gone already
    }
  }
  for (const p of data ? processesOfThisStart() : []) {
    try {
      process.kill(p.pid, "SIGKILL");
    } catch {
      // gone meanwhile
    }
  }
}

afterEach(async () => {
  if (!data || processesOfThisStart().length === 0) return;
  killAll();
  await waitFor(() => processesOfThisStart().length === 0, { timeoutMs: 10_000 });
});

afterAll(async () => {
  killAll();
  await data?.remove();
});

describe("npm start's lifecycle", () => {
  it("stops every process it started when its terminal closes (SIGHUP)", async () => {
    const run = npmStart();
    await ready(run);
    const before = processesOfThisStart();
    // npm and its shells, the supervisor, nats-server, redis-server and the five services
    for (const name of [
      "nats-server",
      "redis-server",
      "scripts/dev.ts",
      ...["mx", "msa", "router", "delivery", "mda"].map((s) => `services/${s}/src/main.ts`),
    ])
      expect(
        before.some((p) => p.cmd.includes(name)),
        `${name} in\n${before.map((p) => p.cmd).join("\n")}`,
      ).toBe(true);

    // a closing terminal hangs up its foreground process group
    process.kill(-run.child.pid!, "SIGHUP");
    await allGone("processes outlived the SIGHUP");
    // its last words may still be in the pipe when the process is gone
    await waitFor(() => /\[mailpipe\] stopped/.test(run.output()), {
      timeoutMs: 10_000,
      message: `no "stopped" in\n${run.output()}`,
    });
    expect(run.output()).not.toMatch(/exited with code [1-9]/);
    expect(() => pidFile()).toThrow(/ENOENT/); // a clean stop leaves no pid file
  }, 240_000);

  it("takes its children along when the supervisor is killed, and starts again on the same ports", async () => {
    const first = npmStart();
    await ready(first);
    const before = processesOfThisStart();
    const supervisor = before.find((p) => p.cmd.includes("scripts/dev.ts"))!;
    const children = before.filter((p) =>
      /nats-server|redis-server|services\/\w+\/src\/main\.ts/.test(p.cmd),
    );
    expect(children).toHaveLength(7);
    // the pid file lists the same children, for the next start to find
    expect(pidFile().supervisor.pid).toBe(supervisor.pid);
    expect(
      pidFile()
        .children.map((c) => c.pid)
        .sort(),
    ).toEqual(children.map((c) => c.pid).sort());

    process.kill(supervisor.pid, "SIGKILL"); // no handler runs: the kernel has to take the rest along
    await first.exited;

    const second = npmStart();
    await ready(second);
    const alive = new Set(processesOfThisStart().map((p) => p.pid));
    for (const c of children)
      expect(alive.has(c.pid), `${c.cmd} (pid ${c.pid}) of the killed start`).toBe(false);
    expect(second.output()).not.toMatch(/is taken/);

    process.kill(-second.child.pid!, "SIGINT");
    await allGone("processes outlived Ctrl-C");
  }, 300_000);

  it("names the process holding a port it needs", async () => {
    const blocker: Server = createServer();
    const port = Number(env.DEV_NATS_PORT);
    await new Promise<void>((r) => blocker.listen(port, "127.0.0.1", () => r()));
    try {
      const run = npmStart();
      const exit = await run.exited;
      expect(exit.code).toBe(1);
      expect(run.output()).toContain(`port ${port} (NATS) is taken by pid ${process.pid} (`);
      expect(run.output()).toContain("stop it, or set DEV_NATS_PORT or NATS_URL");
      await allGone("processes outlived a start that could not start");
    } finally {
      await new Promise((r) => blocker.close(r));
    }
  }, 120_000);
});
