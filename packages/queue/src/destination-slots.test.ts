// Destination slots, rates and wait lists in a real Redis: what the router and the workers rely on.
import { newQueueId, replies } from "@mailpipe/contracts";
import { type ServerHandle, startRedis } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  DestinationSlots,
  MailQueue,
  type MessageInput,
  type RecipientRecord,
  type RetryJob,
  type SitePolicy,
  siteOf,
} from "./index.ts";

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

const LEASE = 10_000;
const T0 = 1_750_000_000_000;
const site = siteOf(["mx2.remote.test", "MX1.remote.test."]);
const five: SitePolicy = { connections: 5, priority: 0 };

function message(queueId = newQueueId()): MessageInput {
  return {
    queueId,
    mailFrom: "sender@other.test",
    receivedAt: new Date(T0).toISOString(),
    source: "mx",
    body: { bucket: "mail-bodies", key: queueId, size: 10, sha256: "a".repeat(64) },
    smtputf8: false,
    bodyType: "7BIT",
    notices: true,
  };
}

function remote(address: string, seq = 0): RecipientRecord {
  return {
    rid: `r:${address}`,
    seq,
    kind: "remote",
    address,
    domain: address.split("@")[1]!,
    state: "pending",
    attempt: 1,
    notifyFailure: true,
    notifyDelay: true,
  };
}

function setup() {
  const queue = new MailQueue(redis);
  const slots = new DestinationSlots(redis, { leaseMs: LEASE });
  /** a message with `n` recipients at remote.test, routed (state in Redis), as the router makes it */
  const routed = async (n = 1) => {
    const m = message();
    const rcpts = Array.from({ length: n }, (_, i) => remote(`u${i}@remote.test`, i));
    await queue.createMessage(m, rcpts, T0);
    return { queueId: m.queueId, rids: rcpts.map((r) => r.rid) };
  };
  const inUse = async () => (await slots.stats(10, T0)).find((s) => s.site === site.id)?.inUse ?? 0;
  return { queue, slots, routed, inUse };
}

describe("destination sites", () => {
  it("names a site after its MX hosts, whatever their order, case or trailing dot", () => {
    expect(siteOf(["mx1.remote.test", "mx2.remote.test"])).toEqual(site);
    expect(site.label).toBe("mx1.remote.test,mx2.remote.test");
    expect(site.id).toMatch(/^[0-9a-f]{16}$/);
    expect(siteOf(["mx1.remote.test"]).id).not.toBe(site.id);
  });
});

describe("slots", () => {
  it("gives out at most the limit; the others wait, and a release hands the slot to the first in line", async () => {
    const { queue, slots, routed, inUse } = setup();
    const held: string[] = [];
    for (let i = 0; i < 5; i++) {
      const { queueId, rids } = await routed();
      const token = `${queueId}:remote_test:1`;
      expect(await slots.admit(site, five, token, queueId, rids, T0)).toEqual({ status: "ok", granted: 0 });
      held.push(token);
    }
    expect(await inUse()).toBe(5);
    const sixth = await routed(3);
    const seventh = await routed();
    expect(await slots.admit(site, five, "sixth", sixth.queueId, sixth.rids, T0 + 1)).toEqual({
      status: "wait",
      granted: 0,
      waiting: 3,
    });
    expect(await slots.admit(site, five, "seventh", seventh.queueId, seventh.rids, T0 + 2)).toMatchObject({
      status: "wait",
    });
    // a redelivered spool message: the same token keeps its slot, waiting recipients are not added twice
    expect(await slots.admit(site, five, held[0]!, "x", [], T0 + 3)).toEqual({ status: "ok", granted: 0 });
    expect(await slots.admit(site, five, "sixth", sixth.queueId, sixth.rids, T0 + 3)).toEqual({
      status: "wait",
      granted: 0,
      waiting: 0,
    });
    // waiting recipients wait for a slot, not for a worker's result: the watchdog leaves them alone
    expect(await queue.staleCandidates(T0 + 10, 10)).toHaveLength(5);
    // nothing is due before a slot frees
    expect(await queue.claim(T0 + 5, 100, 60_000)).toEqual([]);

    expect(await slots.release([{ site: site.id, token: held[0]! }], T0 + 10)).toBe(1);
    expect(await slots.release([{ site: site.id, token: held[0]! }], T0 + 10)).toBe(0);
    const jobs = (await queue.claim(T0 + 10, 100, 60_000)) as RetryJob[];
    // the whole message goes as one group, under one slot's token
    expect(jobs.map((j) => j.recipient.rid).sort()).toEqual(sixth.rids);
    expect(new Set(jobs.map((j) => j.slot?.token)).size).toBe(1);
    expect(jobs[0]!.slot).toMatchObject({ site: site.id, token: expect.stringMatching(/^g\d+$/) });
    expect(jobs[0]).toMatchObject({ kind: "retry", queueId: sixth.queueId, recipient: { attempt: 1 } });
    // the scheduler publishes them; a redelivered spool message (its router died before the ack)
    // then admits nothing for them again
    await queue.completeDispatched(jobs, T0 + 11, new Map(jobs.map((j) => [j.id, 7])));
    expect(await slots.admit(site, five, "sixth", sixth.queueId, sixth.rids, T0 + 12)).toEqual({
      status: "wait",
      granted: 0,
      waiting: 0,
    });
    expect(await inUse()).toBe(5);
    // the seventh is still waiting
    expect((await slots.stats(10, T0)).find((s) => s.site === site.id)).toMatchObject({
      waiting: 1,
      limit: 5,
      label: site.label,
    });
  });

  it("holds a rate: one message per interval, two at most after a quiet time, the next granted when due", async () => {
    const { queue, slots, routed } = setup();
    const oneASecond: SitePolicy = { connections: 100, rate: { messages: 60, perMs: 60_000 }, priority: 0 };
    const [a, b, c, d] = [await routed(), await routed(), await routed(), await routed()];
    expect((await slots.admit(site, oneASecond, "a", a.queueId, a.rids, T0)).status).toBe("ok");
    expect((await slots.admit(site, oneASecond, "b", b.queueId, b.rids, T0 + 10)).status).toBe("ok");
    expect((await slots.admit(site, oneASecond, "c", c.queueId, c.rids, T0 + 20)).status).toBe("wait");
    expect((await slots.admit(site, oneASecond, "d", d.queueId, d.rids, T0 + 30)).status).toBe("wait");
    const early = await slots.grantDue(T0 + 500);
    expect(early.granted).toBe(0);
    expect(early.nextAt).toBe(T0 + 1000);
    // a late turn does not shift the next: due at T0 + 2000 all the same
    expect(await slots.grantDue(T0 + 1300)).toMatchObject({ granted: 1, nextAt: T0 + 2000 });
    expect((await queue.claim(T0 + 1300, 10, 60_000)).map((j) => j.queueId)).toEqual([c.queueId]);
    expect(await slots.grantDue(T0 + 1999)).toMatchObject({ granted: 0 });
    expect(await slots.grantDue(T0 + 2000)).toMatchObject({ granted: 1, nextAt: null });
  });

  it("moves claimed retries to the wait list when the site is full, only while the caller holds them", async () => {
    const { queue, slots, routed } = setup();
    const one: SitePolicy = { connections: 1, priority: 0 };
    const first = await routed();
    expect((await slots.admit(site, one, "first", first.queueId, first.rids, T0)).status).toBe("ok");
    const { queueId, rids } = await routed(2);
    for (const rid of rids) {
      const patch = { lastReply: replies.mailboxFull(), lastAttemptAt: new Date(T0).toISOString() };
      await queue.scheduleRetry(queueId, rid, 1, T0, patch, { delayNotice: false });
    }
    const jobs = (await queue.claim(T0, 10, 60_000)) as RetryJob[];
    expect(jobs).toHaveLength(2);
    const lost = { id: jobs[1]!.id, lease: "not-ours" };
    expect(await slots.admitJobs(site, one, "retry", [jobs[0]!, lost], T0)).toEqual({
      status: "wait",
      granted: 0,
      waiting: 1,
    });
    expect((await queue.stats()).inFlight).toBe(1);
    expect(await slots.release([{ site: site.id, token: "first" }], T0 + 1)).toBe(1);
    const granted = (await queue.claim(T0 + 1, 10, 60_000)) as RetryJob[];
    expect(granted.map((j) => j.id)).toEqual([jobs[0]!.id]);
    expect(granted[0]!.recipient.attempt).toBe(2);
    // holding the granted slot: admitting with its token keeps it
    expect(await slots.admitJobs(site, one, granted[0]!.slot!.token, granted, T0 + 2)).toEqual({
      status: "ok",
      granted: 0,
    });
  });

  it("gives a slot back when its lease runs out, unless its request is recorded: then the router decides", async () => {
    const { queue, slots, routed, inUse } = setup();
    const one: SitePolicy = { connections: 1, priority: 0 };
    const a = await routed();
    expect((await slots.admit(site, one, "a", a.queueId, a.rids, T0)).status).toBe("ok");
    // the router died before publishing: nothing recorded, the lease runs out and the slot is free
    const b = await routed();
    expect((await slots.admit(site, one, "b", b.queueId, b.rids, T0 + LEASE + 1)).status).toBe("ok");
    await queue.recordDispatch(
      b.queueId,
      [{ rid: b.rids[0]!, seq: 42 }],
      [{ site: site.id, token: "b", seq: 42, dispatchId: "b-dispatch" }],
    );
    // b's lease runs out too, but its request was recorded: c waits and the loop asks about b
    const c = await routed();
    const later = T0 + 2 * LEASE + 2;
    expect((await slots.admit(site, one, "c", c.queueId, c.rids, later)).status).toBe("wait");
    const due = await slots.grantDue(later);
    expect(due).toMatchObject({
      granted: 0,
      suspects: [{ site: site.id, token: "b", seq: 42, dispatchId: "b-dispatch" }],
    });
    // still queued in MAIL_DELIVER: b keeps its slot, with a new lease
    expect(await slots.settle([{ site: site.id, token: "b", keep: true }], later)).toBe(0);
    expect((await slots.grantDue(later + 1)).suspects).toEqual([]);
    // gone: the slot is free, and c gets it
    expect(await slots.settle([{ site: site.id, token: "b", keep: false }], later + 2)).toBe(1);
    expect((await queue.claim(later + 2, 10, 60_000)).map((j) => j.queueId)).toEqual([c.queueId]);
    expect(await inUse()).toBe(1);
  });

  it("lets a worker renew its slot, retake a free one after its lease ran out, and refuses when full", async () => {
    const { slots, routed } = setup();
    const one: SitePolicy = { connections: 1, priority: 0 };
    const a = await routed();
    await slots.admit(site, one, "a", a.queueId, a.rids, T0);
    expect(await slots.renew({ site: site.id, token: "a" }, T0 + 2 * LEASE, T0 + 1)).toBe("held");
    await slots.release([{ site: site.id, token: "a" }], T0 + 2);
    expect(await slots.renew({ site: site.id, token: "a" }, T0 + LEASE, T0 + 3)).toBe("retaken");
    expect(await slots.renew({ site: site.id, token: "other" }, T0 + LEASE, T0 + 4)).toBe("full");
  });

  it("releases a delivered request's slot in the status's own script, and passes it on", async () => {
    const { queue, slots, routed } = setup();
    const one: SitePolicy = { connections: 1, priority: 0 };
    const a = await routed();
    const b = await routed();
    await slots.admit(site, one, "a", a.queueId, a.rids, T0);
    await slots.admit(site, one, "b", b.queueId, b.rids, T0);
    const ok = { lastReply: replies.delivered(), lastAttemptAt: new Date(T0).toISOString() };
    const res = await queue.finishByAddress(a.queueId, "u0@remote.test", "remote", 1, "delivered", ok, {
      dsn: false,
      now: T0 + 1,
      slot: { site: site.id, token: "a" },
    });
    expect(res).toMatchObject({ status: "ok", granted: 1, finalized: expect.any(String) });
    const due = await queue.claim(T0 + 1, 10, 60_000);
    expect(due.filter((j) => j.kind === "retry").map((j) => j.queueId)).toEqual([b.queueId]);
  });

  it("takes a waiting recipient out of the wait list when it ends another way (an operator's delete)", async () => {
    const { queue, slots, routed } = setup();
    const one: SitePolicy = { connections: 1, priority: 0 };
    const a = await routed();
    const b = await routed();
    await slots.admit(site, one, "a", a.queueId, a.rids, T0);
    await slots.admit(site, one, "b", b.queueId, b.rids, T0);
    expect(await queue.deleteScheduled(`${b.queueId}:${b.rids[0]}`, { action: "drop" }, T0)).toBe("marked");
    expect((await slots.stats(10, T0))[0]).toMatchObject({ waiting: 0 });
    // the slot a frees finds nobody waiting
    expect(await slots.release([{ site: site.id, token: "a" }], T0 + 1)).toBe(0);
  });

  it("keeps a domain rule's limit for a shared site against a default written later", async () => {
    const { slots, routed } = setup();
    const a = await routed();
    await slots.admit(site, { connections: 2, priority: 2 }, "a", a.queueId, a.rids, T0);
    const b = await routed();
    // another domain on the same hosts, with only the default (5): the domain's 2 still holds
    await slots.admit(site, five, "b", b.queueId, b.rids, T0 + 1);
    const c = await routed();
    expect((await slots.admit(site, five, "c", c.queueId, c.rids, T0 + 2)).status).toBe("wait");
    expect((await slots.stats(10, T0))[0]).toMatchObject({ limit: 2, inUse: 2, waiting: 1 });
  });
});
