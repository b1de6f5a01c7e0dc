import { type ServerHandle, startRedis } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MessageRateLimiter } from "./rate-limit.ts";

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

describe("MessageRateLimiter", () => {
  it("counts accepted messages per user over a sliding window, shared between clients", async () => {
    const one = new MessageRateLimiter(a, { limit: 3, windowMs: 500, prefix: "r1:" });
    const two = new MessageRateLimiter(b, { limit: 3, windowMs: 500, prefix: "r1:" });
    expect(await one.allows("alice@example.test")).toBe(true);
    await one.record("alice@example.test", "q1");
    await two.record("Alice@example.test", "q2");
    expect(await two.allows("alice@example.test")).toBe(true);
    expect(await one.record("alice@example.test", "q3")).toBe(3);
    expect(await two.allows("alice@example.test")).toBe(false);
    expect(await two.allows("bob@example.test")).toBe(true);
    await new Promise((r) => setTimeout(r, 600));
    expect(await one.allows("alice@example.test")).toBe(true);
  });

  it("a limit of 0 means no limit", async () => {
    const none = new MessageRateLimiter(a, { limit: 0, windowMs: 500, prefix: "r2:" });
    for (let i = 0; i < 5; i++) await none.record("alice@example.test", `q${i}`);
    expect(await none.allows("alice@example.test")).toBe(true);
  });
});
