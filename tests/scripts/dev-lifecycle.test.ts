// npm start's hold on its processes (scripts/dev-lifecycle.ts), with real processes: children die
// with their supervisor, the pid file stops only what is still ours, and a taken port is named with
// the process that holds it.
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { freePort, repoRoot, type TempDir, tempDir, waitFor } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  AlreadyRunningError,
  ensurePortsFree,
  hasParentDeathSignal,
  identify,
  isAlive,
  PidFile,
  type PidFileContent,
  portHolder,
  stopStale,
} from "../../scripts/dev-lifecycle.ts";

const lifecycle = join(repoRoot, "scripts", "dev-lifecycle.ts");
const started: ChildProcess[] = [];
let dir: TempDir;

const running = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

function sleeper(): ChildProcess {
  const child = spawn("sleep", ["600"], { stdio: "ignore" });
  started.push(child);
  return child;
}

/** Runs a node script (ESM, may import TypeScript) and resolves with its first line of output. */
function script(code: string): Promise<{ child: ChildProcess; line: string }> {
  const child = spawn(process.execPath, ["--input-type=module", "-e", code], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  started.push(child);
  return new Promise((resolve, reject) => {
    let out = "";
    child.stdout!.on("data", (d) => {
      out += d.toString();
      const nl = out.indexOf("\n");
      if (nl >= 0) resolve({ child, line: out.slice(0, nl) });
    });
    child.once("exit", (code) => reject(new Error(`script exited with ${code} before printing: ${out}`)));
  });
}

beforeAll(async () => {
  dir = await tempDir("dev-lifecycle");
});

afterEach(() => {
  for (const c of started.splice(0)) if (c.pid && running(c.pid)) c.kill("SIGKILL");
});

afterAll(async () => {
  await dir?.remove();
});

describe("children of npm start", () => {
  it("get SIGTERM from the kernel when their supervisor is killed outright", async () => {
    expect(hasParentDeathSignal()).toBe(true); // util-linux's setpriv, on every Debian
    const { child: parent, line } = await script(`
      import { spawn } from "node:child_process";
      import { withParentDeathSignal } from ${JSON.stringify(lifecycle)};
      const [cmd, args] = withParentDeathSignal("sleep", ["600"]);
      const c = spawn(cmd, args, { stdio: "ignore", detached: true });
      console.log(c.pid);
      setInterval(() => {}, 1000);
    `);
    const grandchild = Number(line);
    await waitFor(() => readFileSync(`/proc/${grandchild}/cmdline`, "utf8").startsWith("sleep"), {
      message: "the child never ran sleep",
    });
    parent.kill("SIGKILL");
    // it is the parent's own child, in its own session: only the death signal can end it
    await waitFor(
      () => {
        try {
          return readFileSync(`/proc/${grandchild}/stat`, "utf8").split(") ")[1]!.startsWith("Z") || false;
        } catch {
          return true;
        }
      },
      { timeoutMs: 10_000, message: `pid ${grandchild} outlived its killed parent` },
    );
  });
});

describe("the pid file", () => {
  it("lets the next start stop what a killed supervisor left running, and then goes away", async () => {
    const path = join(dir.path, "stale.pids");
    const [svc, infra] = [sleeper(), sleeper()];
    const file = new PidFile(path);
    file.add("router", svc.pid, "sleep");
    file.add("nats", infra.pid, "sleep");
    const content = JSON.parse(readFileSync(path, "utf8")) as PidFileContent;
    expect(content.children.map((c) => [c.name, c.pid])).toEqual([
      ["router", svc.pid],
      ["nats", infra.pid],
    ]);
    const order: string[] = [];
    svc.once("exit", () => order.push("router"));
    infra.once("exit", () => order.push("nats"));
    const said: string[] = [];
    const stopped = await stopStale(path, {
      first: (name) => name !== "nats",
      say: (m) => said.push(m),
    });
    expect(stopped.map((s) => s.name).sort()).toEqual(["nats", "router"]);
    await waitFor(() => order.length === 2);
    expect(order).toEqual(["router", "nats"]); // services before the bus they drain into
    expect(said.join("\n")).toMatch(/left running: router \(pid \d+\), nats \(pid \d+\)/);
    expect(() => readFileSync(path)).toThrow(/ENOENT/);
  });

  it("never signals a pid that now belongs to another process", async () => {
    const path = join(dir.path, "reused.pids");
    const stranger = sleeper();
    const id = identify(stranger.pid!, "sleep")!;
    expect(isAlive(id)).toBe(true);
    // the same pid, but a start time of an earlier process: the pid was reused
    const reused = { ...id, name: "mx", startTime: String(Number(id.startTime) - 1) };
    const otherProgram = { ...id, name: "redis", command: "redis-server" };
    const content: PidFileContent = {
      supervisor: { pid: 1 << 22, startTime: "1", bootId: id.bootId, command: "node" },
      children: [reused, otherProgram],
    };
    writeFileSync(path, JSON.stringify(content));
    const said: string[] = [];
    expect(await stopStale(path, { say: (m) => said.push(m) })).toEqual([]);
    expect(running(stranger.pid!)).toBe(true);
    expect(said.join("\n")).toMatch(new RegExp(`pid ${stranger.pid} \\(was mx\\) now belongs to another`));
  });

  it("refuses a second start while the first supervisor still runs", async () => {
    const path = join(dir.path, "running.pids");
    const first = sleeper();
    const content: PidFileContent = {
      supervisor: identify(first.pid!, "sleep")!,
      children: [],
    };
    writeFileSync(path, JSON.stringify(content));
    await expect(stopStale(path)).rejects.toBeInstanceOf(AlreadyRunningError);
    await expect(stopStale(path)).rejects.toThrow(`supervisor pid ${first.pid}`);
    expect(running(first.pid!)).toBe(true);
    expect(readFileSync(path, "utf8")).toContain(String(first.pid));
  });
});

describe("a taken port", () => {
  it("is reported with the process holding it and the variable that moves it", async () => {
    const [tcp, udp] = [await freePort(), await freePort()];
    const { child, line } = await script(`
      import net from "node:net";
      import dgram from "node:dgram";
      net.createServer().listen(${tcp}, "127.0.0.1", () => {
        dgram.createSocket("udp4").bind(${udp}, "127.0.0.1", () => console.log("listening"));
      });
    `);
    expect(line).toBe("listening");
    expect(await portHolder(tcp)).toMatch(new RegExp(`^pid ${child.pid} \\(.*node`));
    expect(await portHolder(udp, "udp")).toMatch(new RegExp(`^pid ${child.pid} `));
    const err = await ensurePortsFree(
      [
        { port: tcp, what: "NATS", setting: "DEV_NATS_PORT or NATS_URL" },
        { port: udp, what: "DNS", setting: "DEV_DNS_PORT", protocol: "udp" },
        { port: await freePort(), what: "Redis", setting: "DEV_REDIS_PORT" },
      ],
      "127.0.0.1",
    ).then(
      () => undefined,
      (e: Error) => e.message,
    );
    expect(err).toContain(`port ${tcp} (NATS) is taken by pid ${child.pid} (`);
    expect(err).toContain("stop it, or set DEV_NATS_PORT or NATS_URL");
    expect(err).toContain(`UDP port ${udp} (DNS) is taken by pid ${child.pid}`);
    expect(err).not.toContain("Redis");
  });
});
