// Destination admission in the router (real NATS, Redis and DNS; the harness plays the workers): a
// remote request is published only with a destination slot, recipients with none wait in the
// schedule, a status passes its slot on, and a slot whose lease ran out is given back only when its
// request left MAIL_DELIVER.
import { RemoteDeliveryRequest, replies, reply } from "@mailpipe/contracts";
import { waitFor } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  type Environment,
  type Peers,
  startEnvironment,
  startPeers,
  startTestRouter,
  type TestRouter,
} from "../test/harness.ts";

let env: Environment;
let peers: Peers;
const routers: TestRouter[] = [];

beforeAll(async () => {
  env = await startEnvironment();
});
afterAll(async () => {
  await env?.stop();
});
beforeEach(async () => {
  await env.reset();
});
afterEach(async () => {
  for (const r of routers.splice(0)) await r.stop();
  await peers?.stop();
});

async function router(overrides: Record<string, string> = {}): Promise<TestRouter> {
  const r = await startTestRouter(env, overrides);
  routers.push(r);
  return r;
}

// remote.test's MX hosts (test/harness.ts)
const SITE = "mx1.remote.test,mx2.remote.test";
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const remoteFor = (ids: Set<string>) => peers.remote.filter((q) => ids.has(q.queueId));

describe("destination admission", () => {
  it("publishes at most the limit, keeps the rest waiting in the schedule, and passes each slot on", async () => {
    peers = await startPeers(env);
    const r = await router({ DESTINATION_CONNECTIONS: "2" });
    const mails = [];
    for (let i = 0; i < 5; i++) mails.push(await peers.queue({ rcptTo: [`u${i}@remote.test`] }));
    const ids = new Set(mails.map((m) => m.queueId));
    await waitFor(() => remoteFor(ids).length === 2, { message: "two requests" });
    await waitFor(async () => (await r.metric("destination_waiting_recipients", { site: SITE })) === 3, {
      message: "three recipients waiting",
    });
    expect(await r.metric("destination_slots_in_use", { site: SITE })).toBe(2);
    expect(await r.metric("destination_admissions_total", { result: "wait" })).toBe(3);
    // nothing more goes out while both slots are held
    await sleep(500);
    expect(remoteFor(ids)).toHaveLength(2);
    const first = remoteFor(ids);
    expect(first.every((q) => q.slot && q.slot.until > Date.now() && q.slot.leaseMs === 60_000)).toBe(true);
    expect(new Set(first.map((q) => q.slot!.token)).size).toBe(2);

    // each delivered status hands its slot to the next in line, until everything went out
    const reported = new Set<string>();
    while (reported.size < 5) {
      const out = remoteFor(ids);
      expect(out.length - reported.size).toBeLessThanOrEqual(2);
      const next = out.find((q) => !reported.has(q.dispatchId));
      if (!next) {
        await sleep(20);
        continue;
      }
      reported.add(next.dispatchId);
      await peers.status(next, next.recipients[0]!.address, "delivered", replies.delivered());
      await waitFor(() => remoteFor(ids).length >= Math.min(5, reported.size + 2), {
        message: `request ${reported.size + 2}`,
      });
    }
    const all = remoteFor(ids);
    expect(all).toHaveLength(5);
    expect(new Set(all.map((q) => q.queueId))).toEqual(ids);
    // the waiting ones went out through the retry path, still as attempt 1, under a granted slot
    const later = all.filter((q) => q.slot!.token.startsWith("g"));
    expect(later).toHaveLength(3);
    expect(later.every((q) => q.recipients[0]!.attempt === 1)).toBe(true);
    await waitFor(async () => (await r.metric("destination_slots_in_use", { site: SITE })) === 0, {
      message: "every slot released",
    });
  });

  it("sends a retry through the same admission: a deferred status frees the slot, the retry waits its turn", async () => {
    peers = await startPeers(env);
    await router({ DESTINATION_CONNECTIONS: "1", RETRY_SCHEDULE: "200ms" });
    const a = await peers.queue({ rcptTo: ["a@remote.test"] });
    const b = await peers.queue({ rcptTo: ["b@remote.test"] });
    const first = await peers.waitRemote((q) => q.queueId === a.queueId, "a's first attempt");
    await sleep(300);
    expect(peers.remote.find((q) => q.queueId === b.queueId)).toBeUndefined();

    await peers.status(first, "a@remote.test", "deferred", reply(451, "4.4.1", "try later"));
    const bReq = await peers.waitRemote((q) => q.queueId === b.queueId, "b, granted a's slot");
    // a's retry is due in 200 ms but finds the slot taken by b: it waits
    await sleep(600);
    expect(peers.remote.filter((q) => q.queueId === a.queueId)).toHaveLength(1);
    await peers.status(bReq, "b@remote.test", "delivered", replies.delivered());
    const retry = await peers.waitRemote(
      (q) => q.queueId === a.queueId && q.recipients[0]!.attempt === 2,
      "a's second attempt",
    );
    expect(retry.slot).toBeDefined();
  });

  it("gives a slot back after its lease when its request left MAIL_DELIVER unreported, and keeps it while the request waits there", async () => {
    // no worker: requests stay in MAIL_DELIVER
    peers = await startPeers(env, { consume: false });
    const r = await router({
      DESTINATION_CONNECTIONS: "1",
      DESTINATION_SLOT_LEASE: "1s",
      SCHEDULER_INTERVAL: "100ms",
    });
    const a = await peers.queue({ rcptTo: ["a@remote.test"] });
    const b = await peers.queue({ rcptTo: ["b@remote.test"] });
    await waitFor(async () => (await r.metric("destination_waiting_recipients", { site: SITE })) === 1, {
      message: "b waiting",
    });
    // several leases later a's request is still queued: its slot holds, b still waits
    await sleep(3000);
    expect(await r.metric("destination_waiting_recipients", { site: SITE })).toBe(1);
    expect(await r.metric("destination_slots_reclaimed_total")).toBe(0);

    // a worker takes a's request and acks it without a status (it died after the ack, say)
    const seen: RemoteDeliveryRequest[] = [];
    const sub = await peers.bus.consume("delivery", RemoteDeliveryRequest, (req) => {
      seen.push(req);
    });
    try {
      await waitFor(() => seen.some((q) => q.queueId === b.queueId), {
        timeoutMs: 15_000,
        message: "b published once a's slot came back",
      });
    } finally {
      await sub.stop();
    }
    expect(seen.filter((q) => q.queueId === a.queueId)).toHaveLength(1);
    expect(await r.metric("destination_slots_reclaimed_total")).toBeGreaterThanOrEqual(1);
  });

  it("applies per-destination overrides: a domain rule on top of the default", async () => {
    peers = await startPeers(env);
    const r = await router({
      DESTINATION_CONNECTIONS: "1",
      DESTINATION_LIMITS: '{"remote.test": {"connections": 3}}',
    });
    const mails = [];
    for (let i = 0; i < 4; i++) mails.push(await peers.queue({ rcptTo: [`u${i}@remote.test`] }));
    const ids = new Set(mails.map((m) => m.queueId));
    await waitFor(() => remoteFor(ids).length === 3, { message: "three requests" });
    await waitFor(async () => (await r.metric("destination_waiting_recipients", { site: SITE })) === 1, {
      message: "one waiting",
    });
    // other.test has no rule: the default of 1
    const o1 = await peers.queue({ rcptTo: ["x@other.test"] });
    const o2 = await peers.queue({ rcptTo: ["y@other.test"] });
    await peers.waitRemote((q) => q.queueId === o1.queueId, "other.test's first");
    await waitFor(
      async () => (await r.metric("destination_waiting_recipients", { site: "mx.other.test" })) === 1,
      { message: "other.test's second waiting" },
    );
    expect(peers.remote.find((q) => q.queueId === o2.queueId)).toBeUndefined();
  });
});
