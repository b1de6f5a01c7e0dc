// REDIS_SENTINELS: the services find their Redis master through a real Sentinel (redis-server
// --sentinel, from Debian's redis-server package).
import { startRedis, startRedisSentinel } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterEach, describe, expect, it } from "vitest";
import { createRedis } from "./index.ts";

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

describe("Redis through Sentinel", () => {
  it("connects to the master the Sentinels name, in REDIS_URL's database", async () => {
    const master = await startRedis();
    cleanups.push(() => master.stop());
    const sentinel = await startRedisSentinel(master);
    cleanups.push(() => sentinel.stop());

    const r = createRedis({
      REDIS_URL: "redis://ignored.invalid:1/3",
      REDIS_SENTINELS: `${sentinel.host}:${sentinel.port}`,
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
