// The worker's side of the destination limits, against a real Redis holding the router's slots.
import { Writable } from "node:stream";
import type { RequestSlot } from "@mailpipe/contracts";
import { DestinationSlots, siteOf } from "@mailpipe/queue";
import { createLogger } from "@mailpipe/telemetry";
import { type ServerHandle, startRedis, waitFor } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { jitter, slotKeeper } from "./destination-slot.ts";

let server: ServerHandle;
let redis: Redis;

beforeAll(async () => {
  server = await startRedis();
  redis = new Redis(server.url, { maxRetriesPerRequest: 2 });
});
afterAll(async () => {
  redis?.disconnect();
  await server?.stop();
});
beforeEach(async () => {
  await redis.flushall();
});

const site = siteOf(["mx.slow.test"]);
const lines: string[] = [];
const log = createLogger({
  service: "delivery",
  level: "info",
  destination: new Writable({
    write(chunk, _e, cb) {
      lines.push(String(chunk));
      cb();
    },
  }),
});

/** Counts the worker's renewals, and passes them to the real slots in Redis. */
function counted(slots: DestinationSlots) {
  const calls: string[] = [];
  return {
    calls,
    renew: (...args: Parameters<DestinationSlots["renew"]>) => {
      calls.push(args[0].token);
      return slots.renew(...args);
    },
  };
}

/** As the router does for a retry: a slot taken for `token` (with no jobs to move when full). */
async function taken(
  slots: DestinationSlots,
  token: string,
  limit: number,
  leaseMs: number,
): Promise<RequestSlot> {
  const r = await slots.admitJobs(site, { connections: limit, priority: 0 }, token, [], Date.now());
  if (r.status !== "ok") throw new Error("site full");
  return { site: site.id, token, until: Date.now() + leaseMs, leaseMs };
}

describe("the worker's destination slot", () => {
  it("starts a request well within its lease without asking Redis", async () => {
    const slots = new DestinationSlots(redis, { leaseMs: 60_000 });
    const spy = counted(slots);
    const slot = await taken(slots, "a", 1, 60_000);
    expect(await slotKeeper(spy, log).enter(slot)).toBe(true);
    expect(await slotKeeper(spy, log).enter(undefined)).toBe(true);
    expect(spy.calls).toEqual([]);
  });

  it("checks a late request: runs while its slot holds or a slot is free, sends it back when the site is full", async () => {
    const slots = new DestinationSlots(redis, { leaseMs: 60_000 });
    const spy = counted(slots);
    const keeper = slotKeeper(spy, log);
    const a = await taken(slots, "a", 1, 60_000);
    // arrived after its lease (it waited in MAIL_DELIVER): the router kept the slot, so it holds
    expect(await keeper.enter({ ...a, until: Date.now() - 1 })).toBe(true);
    // a request whose slot was given back finds the site full (a holds the only slot)
    expect(await keeper.enter({ ...a, token: "b", until: Date.now() - 1 })).toBe(false);
    expect(spy.calls).toEqual(["a", "b"]);
    await slots.release([{ site: site.id, token: "a" }]);
    // now a slot is free: it takes it again
    expect(await keeper.enter({ ...a, token: "b", until: Date.now() - 1 })).toBe(true);
    expect(await redis.zscore(`mailpipe:site:${site.id}:slots`, "b")).not.toBeNull();
  });

  it("renews the lease while the transaction runs, and stops when it is over", async () => {
    const slots = new DestinationSlots(redis, { leaseMs: 300 });
    const slot = await taken(slots, "long", 1, 300);
    const stop = slotKeeper(slots, log).hold(slot);
    const key = `mailpipe:site:${site.id}:slots`;
    const first = Number(await redis.zscore(key, "long"));
    await waitFor(async () => Number(await redis.zscore(key, "long")) > first + 150, {
      message: "lease renewed",
    });
    stop();
    const last = Number(await redis.zscore(key, "long"));
    await new Promise((r) => setTimeout(r, 400));
    expect(Number(await redis.zscore(key, "long"))).toBe(last);
  });

  it("spreads the busy delay by ±20%", () => {
    expect(jitter(2000, 0.2, () => 0)).toBe(1600);
    expect(jitter(2000, 0.2, () => 1)).toBe(2400);
    expect(jitter(2000, 0.2, () => 0.5)).toBe(2000);
  });
});
