import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { rm, writeFile } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePort, repoRoot, startService, type TempDir, tempDir, waitFor } from "./process.ts";

/** Whether the process runs; a zombie (killed, not yet reaped by init) counts as dead. */
function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
}

function refused(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(false);
    });
    socket.once("error", (err: NodeJS.ErrnoException) => resolve(err.code === "ECONNREFUSED"));
  });
}

// Stands in for a service: logs like pino, answers /readyz after READY_DELAY_MS, drains on SIGTERM.
const FAKE_SERVICE = `
import http from "node:http";
const readyAt = Date.now() + Number(process.env.READY_DELAY_MS ?? 0);
if (process.env.CRASH) {
  console.error(JSON.stringify({ level: 60, msg: process.env.CRASH }));
  process.exit(2);
}
if (process.env.IGNORE_SIGTERM) process.on("SIGTERM", () => console.log("ignoring SIGTERM"));
else process.on("SIGTERM", () => {
  console.error(JSON.stringify({ level: 30, msg: "draining" }));
  server.close(() => process.exit(Number(process.env.EXIT_CODE ?? 0)));
});
const server = http.createServer((req, res) => {
  res.statusCode = req.url !== "/readyz" ? 200 : Date.now() >= readyAt ? 200 : 503;
  res.end(req.url === "/hello" ? "hello " + process.env.GREETING : "");
});
server.listen(Number(process.env.HTTP_PORT), process.env.HTTP_HOST, () => {
  console.log(JSON.stringify({ level: 30, msg: "listening", host: process.env.HTTP_HOST, port: server.address().port }));
});
setTimeout(() => console.log(JSON.stringify({ level: 30, msg: "later" })), Number(process.env.LATER_MS ?? 60_000)).unref();
`;

describe("freePort, tempDir, waitFor", () => {
  it("freePort returns a port that can be bound on loopback", async () => {
    const port = await freePort();
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, "127.0.0.1", resolve);
    });
    expect((server.address() as net.AddressInfo).port).toBe(port);
    await new Promise((resolve) => server.close(resolve));
  });

  it("tempDir creates a directory and removes it", async () => {
    const dir = await tempDir("kit test/1");
    expect(existsSync(dir.path)).toBe(true);
    expect(path.basename(dir.path)).toMatch(/^kit-test-1-/);
    await writeFile(path.join(dir.path, "f"), "x");
    await dir.remove();
    expect(existsSync(dir.path)).toBe(false);
  });

  it("waitFor polls until a value arrives and returns it", async () => {
    let calls = 0;
    const value = await waitFor(
      () => {
        calls++;
        if (calls < 3) throw new Error("not yet");
        return calls === 3 ? null : { calls };
      },
      { intervalMs: 10 },
    );
    expect(value).toEqual({ calls: 4 });
  });

  it("waitFor times out with the message and the last error", async () => {
    const started = Date.now();
    await expect(
      waitFor(
        () => {
          throw new Error("queue still empty");
        },
        { timeoutMs: 200, intervalMs: 20, message: "message never delivered" },
      ),
    ).rejects.toThrow(/^message never delivered \(timed out after 200 ms; last error: queue still empty\)/);
    expect(Date.now() - started).toBeGreaterThanOrEqual(190);
    await expect(waitFor(() => false, { timeoutMs: 50 })).rejects.toThrow(/last value: false/);
  });
});

describe("startService", () => {
  let dir: TempDir;
  let entry: string;

  beforeAll(async () => {
    dir = await tempDir("fake-service");
    entry = path.join(dir.path, "main.ts");
    await writeFile(entry, FAKE_SERVICE);
  });

  afterAll(() => dir.remove());

  it("resolves the default entry inside the repo", () => {
    expect(existsSync(path.join(repoRoot, "pnpm-workspace.yaml"))).toBe(true);
  });

  it("waits for /readyz, passes env and HTTP_HOST/HTTP_PORT, collects logs, and stops", async () => {
    const started = Date.now();
    const svc = await startService("fake", {
      entry,
      env: { READY_DELAY_MS: "400", GREETING: "from env", EXIT_CODE: "3" },
    });
    try {
      expect(Date.now() - started).toBeGreaterThanOrEqual(400);
      expect(alive(svc.pid)).toBe(true);
      expect(svc.url("/readyz")).toBe(`http://127.0.0.1:${svc.httpPort}/readyz`);
      expect(await fetch(svc.url("hello")).then((r) => r.text())).toBe("hello from env");
      const listening = JSON.parse(await svc.waitForLog('"listening"', 2_000));
      expect(listening).toMatchObject({ host: "127.0.0.1", port: svc.httpPort });
    } finally {
      expect(await svc.stop()).toBe(3);
    }
    expect(svc.logs.some((line) => line.includes('"draining"'))).toBe(true); // stderr is collected too
    expect(await svc.exited).toEqual({ code: 3, signal: null });
    expect(alive(svc.pid)).toBe(false);
  });

  it("waitForLog waits for lines still to come", async () => {
    const svc = await startService("fake", { entry, env: { LATER_MS: "300" } });
    try {
      expect(svc.logs.some((l) => l.includes('"later"'))).toBe(false);
      expect(await svc.waitForLog(/"msg":"later"/, 3_000)).toContain("later");
      await expect(svc.waitForLog("never printed", 100)).rejects.toThrow(/no log line matched/);
    } finally {
      await svc.stop();
    }
  });

  it("fails fast with the last log lines when the service exits before it is ready", async () => {
    const started = Date.now();
    await expect(
      startService("fake", { entry, env: { CRASH: "NATS_URL is required" }, readyTimeoutMs: 20_000 }),
    ).rejects.toThrow(/exited \(code 2, signal null\) before it was ready[\s\S]*NATS_URL is required/);
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it("gives up after readyTimeoutMs and kills the process", async () => {
    const port = await freePort();
    await expect(
      startService("fake", {
        entry,
        env: { READY_DELAY_MS: "60000", HTTP_PORT: String(port) },
        readyTimeoutMs: 800,
      }),
    ).rejects.toThrow(/did not become ready[\s\S]*503[\s\S]*last log lines of fake[\s\S]*"listening"/);
    // nothing answers on its port any more: the child is gone
    expect(await refused(port)).toBe(true);
  });

  it("escalates to SIGKILL when the service ignores the signal", async () => {
    const svc = await startService("fake", { entry, env: { IGNORE_SIGTERM: "1" } });
    expect(await svc.stop("SIGTERM", 300)).toBeNull();
    expect(await svc.exited).toEqual({ code: null, signal: "SIGKILL" });
    expect(svc.logs).toContain("ignoring SIGTERM");
  });
});

describe("children do not outlive the test process", () => {
  const index = path.join(path.dirname(fileURLToPath(import.meta.url)), "index.ts");

  for (const ending of ["exit", "SIGTERM"] as const) {
    it(`kills servers and services when the parent ends by ${ending}`, async () => {
      const dir = await tempDir("orphan-check");
      let pids: number[] = [];
      let dirs: string[] = [];
      try {
        const entry = path.join(dir.path, "main.ts");
        await writeFile(entry, FAKE_SERVICE);
        const parentScript = path.join(dir.path, "parent.ts");
        await writeFile(
          parentScript,
          `import { startNats, startRedis, startService } from ${JSON.stringify(index)};
const [nats, redis, svc] = await Promise.all([startNats(), startRedis(), startService("fake", { entry: ${JSON.stringify(entry)} })]);
console.log(JSON.stringify({ pids: [nats.pid, redis.pid, svc.pid], dirs: [nats.dataDir, redis.dataDir] }));
${ending === "exit" ? "process.exit(0);" : "setInterval(() => {}, 1000);"}
`,
        );
        const parent = spawn(process.execPath, [parentScript], { stdio: ["ignore", "pipe", "inherit"] });
        // listen now: with process.exit() the parent may be gone before it is read
        const exited = new Promise<NodeJS.Signals | number | null>((resolve) =>
          parent.once("exit", (code, signal) => resolve(signal ?? code)),
        );
        let out = "";
        parent.stdout.on("data", (chunk: Buffer) => {
          out += chunk.toString();
        });
        const report = await waitFor(() => (out.includes("\n") ? JSON.parse(out) : undefined), {
          timeoutMs: 20_000,
          message: "parent never reported its children",
        });
        ({ pids, dirs } = report as { pids: number[]; dirs: string[] });
        expect(pids).toHaveLength(3);
        if (ending === "SIGTERM") {
          expect(pids.every(alive)).toBe(true);
          parent.kill("SIGTERM");
        }
        expect(await exited).toBe(ending === "exit" ? 0 : "SIGTERM");
        await waitFor(() => pids.every((pid) => !alive(pid)), {
          timeoutMs: 3_000,
          message: "children still alive",
        });
        await waitFor(() => dirs.every((d) => !existsSync(d)), {
          timeoutMs: 3_000,
          message: "temp dirs left behind",
        });
      } finally {
        // if the kit failed, do not leave its orphans behind
        for (const pid of pids.filter(alive)) process.kill(pid, "SIGKILL");
        for (const d of [...dirs, dir.path]) await rm(d, { recursive: true, force: true });
      }
    });
  }
});
