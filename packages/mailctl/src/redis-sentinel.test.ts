// REDIS_SENTINELS: mailctl finds the Redis master through the Sentinels, as the services do (a real
// redis-server --sentinel).
import { MailQueue } from "@mailpipe/queue";
import { freePort, type ServerHandle, startRedis, startRedisSentinel } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { testIo } from "../test/io.ts";
import { run } from "./cli.ts";

let master: ServerHandle;
let sentinel: ServerHandle;
let direct: Redis;
beforeAll(async () => {
  master = await startRedis();
  sentinel = await startRedisSentinel(master);
  direct = new Redis(`${master.url}/2`);
});
afterAll(async () => {
  direct?.disconnect();
  await sentinel?.stop();
  await master?.stop();
});

describe("mailctl through Redis Sentinel", () => {
  it("holds and lists through the master the Sentinels name, in REDIS_URL's database", async () => {
    // REDIS_URL's host cannot be reached: only the Sentinel can lead mailctl to the master
    const env = {
      REDIS_URL: "redis://ignored.invalid:1/2",
      REDIS_SENTINELS: `${sentinel.host}:${sentinel.port}`,
    };
    const hold = testIo("", env);
    expect(await run(["queue", "hold", "--destination", "slow.test"], hold.io), hold.err()).toBe(0);
    expect(hold.out()).toMatch(/on hold: mail to slow\.test/);
    expect(await new MailQueue(direct).holds()).toEqual([{ kind: "destination", domain: "slow.test" }]);

    const list = testIo("", env);
    expect(await run(["queue"], list.io), list.err()).toBe(0);
    expect(list.out()).toMatch(/on hold: mail to slow\.test/);

    const release = testIo("", env);
    expect(await run(["queue", "release", "--destination", "slow.test"], release.io)).toBe(0);
    expect(await new MailQueue(direct).holds()).toEqual([]);
  });

  it("says which Sentinels it could not reach and what to set", async () => {
    const port = await freePort();
    const t = testIo("", { REDIS_SENTINELS: `127.0.0.1:${port}`, REDIS_SENTINEL_NAME: "mail" });
    expect(await run(["tls", "example.test"], t.io)).toBe(1);
    expect(t.err()).toMatch(
      new RegExp(
        `cannot reach Redis at the master "mail" through the Sentinels 127\\.0\\.0\\.1:${port} .*set REDIS_SENTINELS`,
      ),
    );
  });
});
