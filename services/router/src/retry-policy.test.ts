import { describe, expect, it } from "vitest";
import { baseInterval, delayNoticeDue, isExpired, nextAttemptAt, type RetryPolicy } from "./retry-policy.ts";

const m = 60_000;
const policy: RetryPolicy = {
  schedule: [1 * m, 5 * m, 15 * m],
  jitter: 0.1,
  lifetimeMs: 5 * 86_400_000,
  delayWarningMs: 4 * 3_600_000,
};
const received = "2025-03-04T09:00:00.000Z";
const t0 = Date.parse(received);

describe("retry policy", () => {
  it("walks the schedule and then keeps its last interval", () => {
    expect([1, 2, 3, 4, 10].map((a) => baseInterval(policy, a))).toEqual([m, 5 * m, 15 * m, 15 * m, 15 * m]);
  });

  it("spreads retries by at most the jitter fraction either way", () => {
    expect(nextAttemptAt(policy, 2, received, t0, () => 0)).toBe(t0 + 4.5 * m);
    expect(nextAttemptAt(policy, 2, received, t0, () => 1)).toBe(t0 + 5.5 * m);
    expect(nextAttemptAt(policy, 2, received, t0, () => 0.5)).toBe(t0 + 5 * m);
  });

  it("never schedules past the expiry, and expires at the lifetime", () => {
    const nearEnd = t0 + policy.lifetimeMs - 2 * m;
    expect(nextAttemptAt(policy, 9, received, nearEnd, () => 0.5)).toBe(t0 + policy.lifetimeMs);
    expect(isExpired(policy, received, t0 + policy.lifetimeMs - 1)).toBe(false);
    expect(isExpired(policy, received, t0 + policy.lifetimeMs)).toBe(true);
  });

  it("calls for the delay notice after DELAY_WARNING, never when it is 0", () => {
    expect(delayNoticeDue(policy, received, t0 + 3 * 3_600_000)).toBe(false);
    expect(delayNoticeDue(policy, received, t0 + 4 * 3_600_000)).toBe(true);
    expect(delayNoticeDue({ ...policy, delayWarningMs: 0 }, received, t0 + 86_400_000)).toBe(false);
  });
});
