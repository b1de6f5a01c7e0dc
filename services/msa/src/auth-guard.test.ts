import { type ServerHandle, startRedis } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuthGuard } from "./auth-guard.ts";

let server: ServerHandle;
let a: Redis;
let b: Redis;

beforeAll(async () => {
  server = await startRedis();
  a = new Redis(server.url);
  b = new Redis(server.url);
});
afterAll(async () => {
  a?.disconnect();
  b?.disconnect();
  await server?.stop();
});

const options = {
  windowMs: 60_000,
  slowdownAfter: 3,
  delayStepMs: 1000,
  maxDelayMs: 5000,
  limitIp: 10,
  limitUser: 5,
  lockoutMs: 60_000,
};

describe("AuthGuard", () => {
  it("slows replies after the threshold and locks the username at its limit, seen by every replica", async () => {
    const one = new AuthGuard(a, { ...options, prefix: "t1:" });
    const two = new AuthGuard(b, { ...options, prefix: "t1:" });
    const attempt = { ip: "192.0.2.1", username: "Alice@Example.test" };
    const delays: number[] = [];
    for (let i = 0; i < 4; i++) {
      const v = await (i % 2 ? two : one).check(attempt);
      expect(v.locked).toBe(false);
      if (!v.locked) delays.push(v.delayMs);
      const r = await (i % 2 ? one : two).failed(attempt);
      expect(r.lockedNow).toEqual([]);
    }
    expect(delays).toEqual([0, 0, 0, 1000]);
    expect(await two.check({ ...attempt, username: " alice@example.test" })).toMatchObject({
      locked: false,
      delayMs: 2000,
      failures: { ip: 4, user: 4 },
    });
    // the fifth failure for the username locks it, from another IP too
    expect((await one.failed({ ...attempt, ip: "192.0.2.9" })).lockedNow).toEqual(["user"]);
    const v = await two.check({ ip: "198.51.100.7", username: "alice@example.test" });
    expect(v).toMatchObject({ locked: true, scope: "user" });
    expect(v.locked && v.retryInMs).toBeGreaterThan(50_000);
    // another user from the same IP is not locked (the IP has 4 failures)
    expect(await one.check({ ip: "192.0.2.1", username: "bob@example.test" })).toMatchObject({
      locked: false,
    });
  });

  it("locks an IP trying many usernames", async () => {
    const guard = new AuthGuard(a, { ...options, prefix: "t2:" });
    for (let i = 0; i < 9; i++) {
      expect((await guard.failed({ ip: "192.0.2.2", username: `user${i}@example.test` })).lockedNow).toEqual(
        [],
      );
    }
    expect((await guard.failed({ ip: "192.0.2.2", username: "user9@example.test" })).lockedNow).toEqual([
      "ip",
    ]);
    expect(await guard.check({ ip: "192.0.2.2", username: "alice@example.test" })).toMatchObject({
      locked: true,
      scope: "ip",
    });
    expect(await guard.check({ ip: "192.0.2.3", username: "alice@example.test" })).toMatchObject({
      locked: false,
    });
  });

  it("a success clears the username's count but not the IP's; a lock ends after the lockout", async () => {
    const guard = new AuthGuard(a, { ...options, prefix: "t3:", lockoutMs: 300, limitUser: 3 });
    const attempt = { ip: "192.0.2.4", username: "carol@example.test" };
    await guard.failed(attempt);
    await guard.failed(attempt);
    await guard.succeeded(attempt);
    expect(await guard.check(attempt)).toMatchObject({ locked: false, failures: { ip: 2, user: 0 } });
    for (let i = 0; i < 3; i++) await guard.failed(attempt);
    expect(await guard.check(attempt)).toMatchObject({ locked: true, scope: "user" });
    await new Promise((r) => setTimeout(r, 400));
    expect(await guard.check(attempt)).toMatchObject({ locked: false, failures: { user: 0 } });
  });

  it("failure counts expire after the window", async () => {
    const guard = new AuthGuard(a, { ...options, prefix: "t4:", windowMs: 200 });
    const attempt = { ip: "192.0.2.5", username: "dave@example.test" };
    await guard.failed(attempt);
    expect(await guard.check(attempt)).toMatchObject({ failures: { ip: 1, user: 1 } });
    await new Promise((r) => setTimeout(r, 300));
    expect(await guard.check(attempt)).toMatchObject({ failures: { ip: 0, user: 0 } });
  });
});
