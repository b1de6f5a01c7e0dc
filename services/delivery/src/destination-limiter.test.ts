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

  it("spreads the busy delay by ±20%", () => {
    expect(jitter(2000, 0.2, () => 0)).toBe(1600);
    expect(jitter(2000, 0.2, () => 1)).toBe(2400);
    expect(jitter(2000, 0.2, () => 0.5)).toBe(2000);
  });
});
