import { tlsDayOf, tlsKeys } from "@mailpipe/contracts";
import { type ServerHandle, startRedis } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { testIo } from "../test/io.ts";
import { run } from "./cli.ts";

let server: ServerHandle;
let redis: Redis;
beforeAll(async () => {
  server = await startRedis();
  redis = new Redis(server.url);
});
afterAll(async () => {
  redis?.disconnect();
  await server?.stop();
});

describe("mailctl tls", () => {
  it("shows the cached MTA-STS policy and the day's TLS results, as delivery keeps them", async () => {
    const policy = {
      domain: "sts.test",
      id: "20261204",
      mode: "enforce",
      mx: ["*.sts.test"],
      maxAge: 86400,
      fetchedAt: "2026-12-04T00:00:00.000Z",
      expiresAt: "2026-12-05T00:00:00.000Z",
      text: "version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n",
    };
    await redis.set(tlsKeys.stsPolicy("sts.test"), JSON.stringify(policy));
    const day = tlsDayOf(new Date());
    await redis.hset(tlsKeys.reportDay(day, "sts.test"), {
      "policy\tsts": JSON.stringify({ type: "sts", strings: [], mxHosts: ["*.sts.test"] }),
      "ok\tsts": "12",
      "fail\tsts\tstarttls-not-supported\tmx2.sts.test\t192.0.2.7": "3",
    });
    const t = testIo("", { REDIS_URL: server.url });
    expect(await run(["tls", "STS.test"], t.io)).toBe(0);
    expect(t.out()).toContain("MTA-STS policy id 20261204: mode enforce, mx *.sts.test");
    expect(t.out()).toContain(`${day} sts: 12 sessions ok, 3 failed`);
    expect(t.out()).toContain("3 × starttls-not-supported at mx2.sts.test [192.0.2.7]");

    const j = testIo("", { REDIS_URL: server.url });
    expect(await run(["tls", "sts.test", "--json"], j.io)).toBe(0);
    const parsed = JSON.parse(j.out());
    expect(parsed.mtaSts).toMatchObject({ id: "20261204", mode: "enforce" });
    expect(parsed.results[0]).toMatchObject({ day, successes: { sts: 12 } });

    const none = testIo("", { REDIS_URL: server.url });
    expect(await run(["tls", "other.test"], none.io)).toBe(0);
    expect(none.out()).toMatch(/no policy cached[\s\S]*no TLS results/);
  });
});
