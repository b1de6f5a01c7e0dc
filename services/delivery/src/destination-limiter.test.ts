import { describe, expect, it } from "vitest";
import { DestinationLimiter, jitter } from "./destination-limiter.ts";

describe("destination limiter", () => {
  it("caps in-flight transactions per destination, independently", () => {
    const l = new DestinationLimiter(2);
    expect(l.tryAcquire("a.test")).toBe(true);
    expect(l.tryAcquire("a.test")).toBe(true);
    expect(l.tryAcquire("a.test")).toBe(false);
    expect(l.tryAcquire("b.test")).toBe(true);
    l.release("a.test");
    expect(l.inFlight("a.test")).toBe(1);
    expect(l.tryAcquire("a.test")).toBe(true);
  });

  it("hands a freed slot to a waiting request, and gives up after the wait", async () => {
    const l = new DestinationLimiter(1);
    expect(await l.acquire("a.test", 0)).toBe(true);
    const waiting = l.acquire("a.test", 5000);
    const late = l.acquire("a.test", 50); // a second waiter would exceed `limit` waiters: refused at once
    expect(await late).toBe(false);
    l.release("a.test");
    expect(await waiting).toBe(true);
    expect(l.inFlight("a.test")).toBe(1); // the slot moved to the waiter, it was not freed
    const t0 = Date.now();
    expect(await l.acquire("a.test", 100)).toBe(false);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(90);
    l.release("a.test");
    expect(l.inFlight("a.test")).toBe(0);
    expect(await l.acquire("a.test", 0)).toBe(true);
  });

  it("spreads the busy delay by ±20%", () => {
    expect(jitter(2000, 0.2, () => 0)).toBe(1600);
    expect(jitter(2000, 0.2, () => 1)).toBe(2400);
    expect(jitter(2000, 0.2, () => 0.5)).toBe(2000);
  });
});
