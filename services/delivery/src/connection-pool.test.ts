import { describe, expect, it } from "vitest";
import { ConnectionPool } from "./connection-pool.ts";
import type { SmtpSession } from "./smtp-session.ts";

/** Stands in for a session: the pool only looks at these members. */
function fakeSession(name: string, messages = 1) {
  const s = {
    name,
    messages,
    usable: true,
    quits: 0,
    destroys: 0,
    quit: async () => {
      s.quits++;
      s.usable = false;
    },
    destroy: () => {
      s.destroys++;
      s.usable = false;
    },
  };
  return s;
}
const asSession = (s: ReturnType<typeof fakeSession>) => s as unknown as SmtpSession;
const pool = (o: Partial<ConstructorParameters<typeof ConnectionPool>[0]> = {}) =>
  new ConnectionPool({ reuse: true, maxMessages: 100, idleMs: 60_000, maxIdle: 10, ...o });

describe("connection pool", () => {
  it("hands back the most recently used session for the same key only", () => {
    const p = pool();
    const a = fakeSession("a");
    const b = fakeSession("b");
    p.put("k", asSession(a));
    p.put("k", asSession(b));
    expect(p.take("other")).toBeUndefined();
    expect(p.take("k")).toBe(asSession(b));
    expect(p.take("k")).toBe(asSession(a));
    expect(p.take("k")).toBeUndefined();
  });

  it("skips sessions that died while idle", () => {
    const p = pool();
    const dead = fakeSession("dead");
    p.put("k", asSession(dead));
    dead.usable = false;
    expect(p.take("k")).toBeUndefined();
    expect(dead.destroys).toBe(1);
  });

  it("closes a session at its message limit, or when reuse is off", () => {
    const full = fakeSession("full", 3);
    pool({ maxMessages: 3 }).put("k", asSession(full));
    expect(full.quits).toBe(1);
    const once = fakeSession("once");
    pool({ reuse: false }).put("k", asSession(once));
    expect(once.quits).toBe(1);
  });

  it("keeps at most maxIdle sessions, closing the one idle longest", () => {
    const p = pool({ maxIdle: 2 });
    const [a, b, c] = [fakeSession("a"), fakeSession("b"), fakeSession("c")];
    p.put("k1", asSession(a));
    p.put("k2", asSession(b));
    p.put("k1", asSession(c));
    expect(p.idleCount).toBe(2);
    expect(a.quits).toBe(1);
    expect(p.take("k1")).toBe(asSession(c));
    expect(p.take("k1")).toBeUndefined();
  });

  it("closes idle sessions after idleMs, and every one on close()", async () => {
    const p = pool({ idleMs: 50 });
    const a = fakeSession("a");
    p.put("k", asSession(a));
    await new Promise((r) => setTimeout(r, 120));
    expect(a.quits).toBe(1);
    expect(p.idleCount).toBe(0);

    const b = fakeSession("b");
    p.put("k", asSession(b));
    await p.close();
    expect(b.quits).toBe(1);
    const late = fakeSession("late");
    p.put("k", asSession(late));
    expect(late.quits).toBe(1);
  });
});
