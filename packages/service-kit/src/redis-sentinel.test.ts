// REDIS_SENTINELS: the services find their Redis master through a real Sentinel (redis-server
// --sentinel, from Debian's redis-server package).
import { spawn } from "node:child_process";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { findBinary, freePort, startRedis, tempDir, waitFor } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterEach, describe, expect, it } from "vitest";
import { createRedis } from "./index.ts";

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function startSentinel(masterPort: number): Promise<number> {
  const dir = await tempDir("sentinel");
  cleanups.push(() => dir.remove());
  const port = await freePort();
  const conf = join(dir.path, "sentinel.conf");
  await writeFile(
    conf,
    [
      `port ${port}`,
      "bind 127.0.0.1",
      `dir ${dir.path}`,
      `sentinel monitor mymaster 127.0.0.1 ${masterPort} 1`,
      "sentinel down-after-milliseconds mymaster 1000",
      "sentinel failover-timeout mymaster 5000",
      "",
    ].join("\n"),
  );
  const bin = findBinary("redis-server");
  if (!bin) throw new Error("redis-server is not installed (scripts/bootstrap.sh installs it)");
  const child = spawn(bin, [conf, "--sentinel"], { stdio: "ignore" });
  cleanups.push(() => {
    child.kill("SIGKILL");
  });
  const probe = new Redis({ port, host: "127.0.0.1", lazyConnect: true, retryStrategy: () => 200 });
  probe.on("error", () => {});
  cleanups.push(() => probe.disconnect());
  await waitFor(
    async () => {
      try {
        const m = (await probe.call("SENTINEL", "get-master-addr-by-name", "mymaster")) as string[] | null;
        return m?.[1] === String(masterPort);
      } catch {
        return false;
      }
    },
    { timeoutMs: 15_000, message: "the sentinel never named its master" },
  );
  return port;
}

describe("Redis through Sentinel", () => {
  it("connects to the master the Sentinels name, in REDIS_URL's database", async () => {
    const master = await startRedis();
    cleanups.push(() => master.stop());
    const masterPort = Number(new URL(master.url).port);
    const sentinelPort = await startSentinel(masterPort);

    const r = createRedis({
      REDIS_URL: "redis://ignored.invalid:1/3",
      REDIS_SENTINELS: `127.0.0.1:${sentinelPort}`,
      REDIS_SENTINEL_NAME: "mymaster",
      REDIS_SENTINEL_PASSWORD: undefined,
    });
    r.on("error", () => {});
    cleanups.push(() => r.disconnect());
    await r.connect();
    await r.set("k", "through sentinel");
    // the value is in database 3 of the master itself
    const direct = new Redis(`${master.url}/3`);
    cleanups.push(() => direct.disconnect());
    expect(await direct.get("k")).toBe("through sentinel");
  });

  it("uses REDIS_URL alone when no Sentinels are given", async () => {
    const master = await startRedis();
    cleanups.push(() => master.stop());
    const r = createRedis({
      REDIS_URL: master.url,
      REDIS_SENTINELS: undefined,
      REDIS_SENTINEL_NAME: "mymaster",
      REDIS_SENTINEL_PASSWORD: undefined,
    });
    cleanups.push(() => r.disconnect());
    await r.connect();
    expect(await r.ping()).toBe("PONG");
  });
});
