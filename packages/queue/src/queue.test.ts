import { newQueueId, replies } from "@mailpipe/contracts";
import { type ServerHandle, startRedis, waitFor } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { MailQueue, type MessageInput, type RecipientRecord, type RetryJob } from "./index.ts";

let server: ServerHandle;
const clients: Redis[] = [];

function client(): Redis {
  const r = new Redis(server.url, { maxRetriesPerRequest: 2, retryStrategy: (n) => Math.min(n * 100, 1000) });
  clients.push(r);
  return r;
}

beforeAll(async () => {
  server = await startRedis();
});
afterAll(async () => {
  for (const c of clients) c.disconnect();
  await server?.stop();
});
beforeEach(async () => {
  await client().flushall();
});

function message(queueId = newQueueId(), over: Partial<MessageInput> = {}): MessageInput {
  return {
    queueId,
    mailFrom: "sender@remote.test",
    receivedAt: new Date().toISOString(),
    source: "mx",
    body: { bucket: "mail-bodies", key: queueId, size: 10, sha256: "a".repeat(64) },
    messageId: `<${queueId}@remote.test>`,
    traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    smtputf8: false,
    bodyType: "8BITMIME",
    notices: true,
    ...over,
  };
}

function remote(address: string, over: Partial<RecipientRecord> = {}): RecipientRecord {
  return {
    rid: `r:${address}`,
    seq: 0,
    kind: "remote",
    address,
    domain: address.split("@")[1]!,
    state: "pending",
    attempt: 1,
    notifyFailure: true,
    notifyDelay: true,
    ...over,
  };
}

const deferred = (at = Date.now()) => ({
  lastReply: replies.mailboxFull(),
  remoteMta: "mx1.remote.test",
  lastAttemptAt: new Date(at).toISOString(),
});

/** A message with `n` recipients, each deferred once so that each has a retry job due at `due`. */
async function scheduled(q: MailQueue, n: number, due: number): Promise<string> {
  const m = message();
  const rcpts = Array.from({ length: n }, (_, i) => remote(`user${i}@remote.test`, { seq: i }));
  await q.createMessage(m, rcpts);
  for (const r of rcpts) {
    const res = await q.scheduleRetry(m.queueId, r.rid, 1, due, deferred(), { delayNotice: false });
    expect(res.status).toBe("ok");
  }
  return m.queueId;
}

describe("message state", () => {
  it("records a message once: a redelivered copy neither resets attempts nor counts twice", async () => {
    const q = new MailQueue(client());
    const m = message();
    const first = await q.createMessage(m, [remote("a@remote.test"), remote("b@remote.test")]);
    expect(first.status).toBe("created");
    await q.scheduleRetry(m.queueId, "r:a@remote.test", 1, Date.now() + 60_000, deferred(), {
      delayNotice: false,
    });

    const again = await q.createMessage(m, [remote("a@remote.test"), remote("b@remote.test")]);
    expect(again.status).toBe("exists");
    if (again.status !== "exists") return;
    const a = again.recipients.find((r) => r.rid === "r:a@remote.test")!;
    expect(a.attempt).toBe(2);
    expect(a.lastReply).toEqual(replies.mailboxFull());
    const state = await q.getMessage(m.queueId);
    expect(state?.message).toMatchObject({
      open: 2,
      total: 2,
      mailFrom: "sender@remote.test",
      notices: true,
    });
    expect(state?.message.body).toEqual(m.body);
  });

  it("ignores stale and duplicate statuses, and finalizes the message when the last recipient is final", async () => {
    const q = new MailQueue(client());
    const m = message();
    await q.createMessage(m, [remote("a@remote.test"), remote("b@remote.test")]);
    await q.scheduleRetry(m.queueId, "r:a@remote.test", 1, Date.now() + 60_000, deferred(), {
      delayNotice: false,
    });
    // a second "deferred" for attempt 1 (redelivery) is stale now
    const dup = await q.scheduleRetry(m.queueId, "r:a@remote.test", 1, Date.now(), deferred(), {
      delayNotice: false,
    });
    expect(dup.status).toBe("stale");
    const stale = await q.finishRecipient(m.queueId, "r:a@remote.test", 1, "delivered", deferred(), {
      dsn: false,
    });
    expect(stale.status).toBe("stale");

    const b = await q.finishRecipient(m.queueId, "r:b@remote.test", 1, "delivered", deferred(), {
      dsn: false,
    });
    expect(b).toMatchObject({ status: "ok", dsnQueued: false });
    expect(b.status === "ok" && b.finalized).toBeFalsy();
    const a = await q.finishRecipient(m.queueId, "r:a@remote.test", 2, "delivered", deferred(), {
      dsn: false,
    });
    expect(a.status === "ok" && a.finalized).toBe(m.receivedAt);

    expect(await q.getMessage(m.queueId)).toBeNull();
    expect(await q.isFinished(m.queueId)).toBe(true);
    expect((await q.createMessage(m, [remote("a@remote.test")])).status).toBe("finished");
    expect((await q.stats()).scheduled).toBe(0);
    // the body's deletion is queued as a task
    const jobs = await q.claim(Date.now(), 10, 60_000);
    expect(jobs).toEqual([expect.objectContaining({ kind: "gc", queueId: m.queueId, body: m.body })]);
  });

  it("finds a local recipient by mailbox or by the copy's address", async () => {
    const q = new MailQueue(client());
    const m = message();
    const local: RecipientRecord = {
      rid: "l:alice@example.test",
      seq: 0,
      kind: "local",
      address: "alice+news@example.test",
      mailbox: "alice@example.test",
      folder: "news",
      state: "pending",
      attempt: 1,
      notifyFailure: true,
      notifyDelay: true,
    };
    await q.createMessage(m, [local]);
    expect((await q.findRecipient(m.queueId, "alice@example.test", "local"))?.rid).toBe(local.rid);
    expect((await q.findRecipient(m.queueId, "alice+news@example.test", "local"))?.rid).toBe(local.rid);
    expect(await q.findRecipient(m.queueId, "bob@example.test", "local")).toBeNull();
  });

  it("finishes the recipient a status names in one call: by remote address, by mailbox or by the copy's address", async () => {
    const q = new MailQueue(client());
    const m = message();
    const local: RecipientRecord = {
      rid: "l:alice@example.test",
      seq: 1,
      kind: "local",
      address: "alice+news@example.test",
      mailbox: "alice@example.test",
      state: "pending",
      attempt: 1,
      notifyFailure: true,
      notifyDelay: true,
    };
    await q.createMessage(m, [remote("a@remote.test"), local]);
    const ok = { lastReply: replies.delivered(), lastAttemptAt: new Date().toISOString() };
    expect(
      await q.finishByAddress(m.queueId, "bob@example.test", "local", 1, "delivered", ok, { dsn: false }),
    ).toEqual({
      status: "missing",
    });
    expect(
      await q.finishByAddress(m.queueId, "a@remote.test", "remote", 2, "delivered", ok, { dsn: false }),
    ).toMatchObject({
      status: "stale",
      recipient: { rid: "r:a@remote.test", attempt: 1, state: "pending" },
    });
    expect(
      await q.finishByAddress(m.queueId, "a@remote.test", "remote", 1, "delivered", ok, { dsn: false }),
    ).toMatchObject({
      status: "ok",
      recipient: { state: "delivered" },
    });
    // mda reports the copy's address (Delivered-To): the alias map finds the mailbox's recipient
    const last = await q.finishByAddress(m.queueId, "alice+news@example.test", "local", 1, "delivered", ok, {
      dsn: false,
    });
    expect(last).toMatchObject({ status: "ok", recipient: { rid: local.rid }, finalized: m.receivedAt });
    expect(await q.getMessage(m.queueId)).toBeNull();
    expect(
      await q.finishByAddress(m.queueId, "a@remote.test", "remote", 1, "delivered", ok, { dsn: false }),
    ).toEqual({
      status: "missing",
    });
  });

  it("batches bounces into one failure DSN task and keeps the body until it is done", async () => {
    const q = new MailQueue(client(), { dsnBatchDelayMs: 0 });
    const m = message();
    await q.createMessage(m, [remote("a@remote.test"), remote("b@remote.test"), remote("c@remote.test")]);
    const now = Date.now();
    const bounce = { lastReply: replies.noSuchUser(), lastAttemptAt: new Date(now).toISOString() };
    expect(
      await q.finishRecipient(m.queueId, "r:a@remote.test", 1, "bounced", bounce, { dsn: true, now }),
    ).toMatchObject({ status: "ok", dsnQueued: true });
    await q.finishRecipient(m.queueId, "r:b@remote.test", 1, "bounced", bounce, { dsn: true, now });
    const [task] = await q.claim(now, 10, 60_000);
    expect(task).toMatchObject({ kind: "dsn", dsnKind: "failure", queueId: m.queueId });
    if (task?.kind !== "dsn") return;

    const first = await q.prepareTask(task, {
      dsnQueueId: "X1",
      rids: '["r:a@remote.test","r:b@remote.test"]',
    });
    const second = await q.prepareTask(task, { dsnQueueId: "X2", rids: "[]" });
    expect(second).toMatchObject({ dsnQueueId: "X1" });
    expect(first).toEqual(second);

    // the last recipient bounces while the DSN is being built: it gets a DSN of its own
    const c = await q.finishRecipient(m.queueId, "r:c@remote.test", 1, "bounced", bounce, { dsn: true, now });
    expect(c.status === "ok" && c.finalized).toBeFalsy();
    const done = await q.completeDsn(task, "failure", ["r:a@remote.test", "r:b@remote.test"], now);
    expect(done).toEqual({ status: "ok" });
    const [next] = await q.claim(now, 10, 60_000);
    expect(next).toMatchObject({ kind: "dsn", dsnKind: "failure", prepared: {} });
    expect(await q.getMessage(m.queueId)).not.toBeNull();
    const last = await q.completeDsn(next!, "failure", ["r:c@remote.test"], now);
    expect(last).toEqual({ status: "ok", finalized: m.receivedAt });
  });

  it("a delivery joins the report only when its recipient asked (NOTIFY=SUCCESS) and a notice is owed", async () => {
    const q = new MailQueue(client(), { dsnBatchDelayMs: 0 });
    const m = message();
    await q.createMessage(m, [
      remote("asked@remote.test", { notifySuccess: true }),
      remote("default@remote.test"),
      remote("passed@remote.test", { notifySuccess: true }),
    ]);
    const now = Date.now();
    const ok = { lastReply: replies.delivered(), lastAttemptAt: new Date(now).toISOString() };
    const finish = (address: string, dsn: boolean) =>
      q.finishByAddress(m.queueId, address, "remote", 1, "delivered", ok, { dsn, now });
    expect(await finish("asked@remote.test", true)).toMatchObject({ status: "ok", dsnQueued: true });
    expect(await finish("default@remote.test", true)).toMatchObject({ status: "ok", dsnQueued: false });
    // the next hop took the DSN request over: the router asks for no notice
    expect(await finish("passed@remote.test", false)).toMatchObject({ status: "ok", dsnQueued: false });
    expect(await q.pendingFinalReports(m.queueId)).toEqual(["r:asked@remote.test"]);
    const [task] = await q.claim(now, 10, 60_000);
    expect(task).toMatchObject({ kind: "dsn", dsnKind: "failure", queueId: m.queueId });
    // the message waits for its report before it is final
    expect(await q.getMessage(m.queueId)).not.toBeNull();
    expect(await q.completeDsn(task!, "failure", ["r:asked@remote.test"], now)).toEqual({
      status: "ok",
      finalized: m.receivedAt,
    });
  });

  it("queues the delay notice once per message, and never for a message that allows no DSNs", async () => {
    const q = new MailQueue(client());
    const m = message();
    await q.createMessage(m, [remote("a@remote.test"), remote("b@remote.test")]);
    const a = await q.scheduleRetry(m.queueId, "r:a@remote.test", 1, Date.now(), deferred(), {
      delayNotice: true,
    });
    const b = await q.scheduleRetry(m.queueId, "r:b@remote.test", 1, Date.now(), deferred(), {
      delayNotice: true,
    });
    expect(a).toMatchObject({ status: "ok", delayNoticeQueued: true });
    expect(b).toMatchObject({ status: "ok", delayNoticeQueued: false });

    const bounce = message(newQueueId(), { mailFrom: "", notices: false });
    await q.createMessage(bounce, [remote("x@remote.test")]);
    const x = await q.scheduleRetry(bounce.queueId, "r:x@remote.test", 1, Date.now(), deferred(), {
      delayNotice: true,
    });
    expect(x).toMatchObject({ status: "ok", delayNoticeQueued: false });
    const done = await q.finishRecipient(bounce.queueId, "r:x@remote.test", 2, "bounced", deferred(), {
      dsn: true,
    });
    expect(done).toMatchObject({ status: "ok", dsnQueued: false, finalized: bounce.receivedAt });
  });
});

describe("retry schedule", () => {
  it("never gives one job to two concurrent claimers", async () => {
    const q = new MailQueue(client());
    const now = Date.now();
    const ids = new Set<string>();
    for (let i = 0; i < 4; i++) await scheduled(q, 50, now - 1000);
    const claimers = [new MailQueue(client()), new MailQueue(client())];
    const got: string[][] = [[], []];
    await Promise.all(
      claimers.map(async (c, i) => {
        for (let round = 0; round < 100; round++) {
          const jobs = await c.claim(Date.now(), 7, 60_000);
          if (jobs.length === 0) break;
          for (const j of jobs) got[i]!.push(j.id);
        }
      }),
    );
    for (const list of got) for (const id of list) ids.add(id);
    expect(got[0]!.length + got[1]!.length).toBe(200);
    expect(ids.size).toBe(200);
    expect(got[0]!.length).toBeGreaterThan(0);
    expect(got[1]!.length).toBeGreaterThan(0);
    expect(await q.stats()).toMatchObject({ scheduled: 0, inFlight: 200 });
  });

  it("returns jobs whose lease expired, and complete() honours only the current lease", async () => {
    const q = new MailQueue(client());
    const now = Date.now();
    await scheduled(q, 1, now - 10);
    const [first] = await q.claim(now, 10, 100);
    expect(first?.kind).toBe("retry");
    expect(await q.claim(now, 10, 100)).toEqual([]);
    expect(await q.releaseExpiredLeases(now + 50)).toBe(0);
    expect(await q.releaseExpiredLeases(now + 200)).toBe(1);
    const [second] = await q.claim(now + 200, 10, 100);
    expect(second?.id).toBe(first!.id);
    expect(second?.lease).not.toBe(first!.lease);

    expect(await q.complete([first!])).toBe(0);
    expect((await q.stats()).inFlight).toBe(1);
    expect(await q.complete([second!])).toBe(1);
    expect(await q.stats()).toMatchObject({ scheduled: 0, inFlight: 0 });
  });

  it("renews a lease only for the holder of its token, so a job taken over is not worked on twice", async () => {
    const a = new MailQueue(client());
    const b = new MailQueue(client());
    const now = Date.now();
    await scheduled(a, 2, now - 10);
    const jobs = await a.claim(now, 10, 100);
    expect(jobs).toHaveLength(2);
    const [j1, j2] = jobs as [RetryJob, RetryJob];
    // renewed before it ran out: another replica's release finds nothing to take
    expect(await a.renewLeases([j1], now + 1000)).toEqual(new Set([j1.id]));
    expect(await b.releaseExpiredLeases(now + 500)).toBe(1); // j2's lease ran out
    const [taken] = await b.claim(now + 500, 10, 60_000);
    expect(taken?.id).toBe(j2.id);
    // the first holder finds out before doing j2's work again
    expect(await a.renewLeases([j1, j2], now + 2000)).toEqual(new Set([j1.id]));
    expect(await b.renewLeases([taken!], now + 2000)).toEqual(new Set([j2.id]));
    expect(await b.releaseExpiredLeases(now + 1500)).toBe(0);
    expect(await a.complete([j1])).toBe(1);
    expect(await b.complete([taken!])).toBe(1);
    expect(await a.renewLeases([j1], now + 3000)).toEqual(new Set());
    expect(await a.stats()).toMatchObject({ scheduled: 0, inFlight: 0 });
  });

  it("a retry scheduled while the previous attempt's job is still leased survives that job's complete()", async () => {
    const q = new MailQueue(client());
    const queueId = await scheduled(q, 1, Date.now() - 10);
    const [job] = (await q.claim(Date.now(), 10, 60_000)) as RetryJob[];
    expect(job?.recipient.attempt).toBe(2);
    // the attempt-2 status arrives before the scheduler completed the job
    await q.scheduleRetry(queueId, job!.recipient.rid, 2, Date.now() + 60_000, deferred(), {
      delayNotice: false,
    });
    expect(await q.complete([job!])).toBe(0);
    const list = await q.listScheduled();
    expect(list).toHaveLength(1);
    expect(list[0]).toMatchObject({ id: job!.id, attempts: 2 });
    expect(await q.stats()).toMatchObject({ scheduled: 1, inFlight: 0 });
  });

  it("lists, flushes and marks scheduled retries for mailctl", async () => {
    const q = new MailQueue(client());
    const later = Date.now() + 3600_000;
    const queueId = await scheduled(q, 2, later);
    const list = await q.listScheduled({ limit: 10 });
    expect(list).toHaveLength(2);
    expect(list[0]).toMatchObject({
      queueId,
      kind: "remote",
      destination: "remote.test",
      attempts: 1,
      lastReply: replies.mailboxFull(),
      nextAttemptAt: new Date(later).toISOString(),
    });
    expect(list.map((e) => e.recipient).sort()).toEqual(["user0@remote.test", "user1@remote.test"]);
    expect(await q.listScheduled({ limit: 1 })).toHaveLength(1);

    const stats = await q.stats();
    expect(stats).toMatchObject({ scheduled: 2, inFlight: 0, oldestDueAt: new Date(later).toISOString() });
    expect(stats.oldestReceivedAt).not.toBeNull();

    expect(await q.claim(Date.now(), 10, 60_000)).toEqual([]);
    expect(await q.deleteScheduled(list[0]!.id, { action: "bounce" })).toBe("marked");
    expect(await q.deleteScheduled("nope", { action: "drop" })).toBe("not-found");
    const [marked] = (await q.claim(Date.now(), 10, 60_000)) as RetryJob[];
    expect(marked).toMatchObject({ id: list[0]!.id, mark: "bounce" });
    expect(await q.deleteScheduled(list[0]!.id, { action: "drop" })).toBe("in-flight");

    expect(await q.flushScheduled()).toBe(1);
    const [flushed] = await q.claim(Date.now(), 10, 60_000);
    expect(flushed?.id).toBe(list[1]!.id);
  });

  it("holds retries by destination, message or all, across restarts, until released", async () => {
    const q = new MailQueue(client());
    const now = Date.now();
    const heldQ = await scheduled(q, 2, now - 1000); // due already, to remote.test
    const other = message();
    await q.createMessage(other, [remote("x@elsewhere.test")]);
    await q.scheduleRetry(other.queueId, "r:x@elsewhere.test", 1, now - 1000, deferred(), {
      delayNotice: false,
    });

    expect(await q.hold({ kind: "destination", domain: "Remote.TEST" })).toBe(2);
    expect(await q.holds()).toEqual([{ kind: "destination", domain: "remote.test" }]);
    // the other destination still goes out; the held ones do not
    const claimed = await q.claim(Date.now(), 10, 60_000);
    expect(claimed.map((j) => j.queueId)).toEqual([other.queueId]);
    const list = await q.listScheduled();
    expect(list.filter((e) => e.held).map((e) => e.queueId)).toEqual([heldQ, heldQ]);

    // a retry that comes due later under the hold is set aside when it comes due
    const late = await scheduled(q, 1, Date.now() + 200);
    await new Promise((r) => setTimeout(r, 300));
    expect(await q.claim(Date.now(), 10, 60_000)).toEqual([]);

    // a router restarting reads the same rules (they are in Redis)
    const again = new MailQueue(client());
    expect(await again.holds()).toHaveLength(1);
    expect(await again.claim(Date.now(), 10, 60_000)).toEqual([]);

    // a message hold outlives the destination's release for that message only
    expect(await again.hold({ kind: "message", queueId: late })).toBe(0);
    expect(await again.release({ kind: "destination", domain: "remote.test" })).toBe(2);
    const released = await again.claim(Date.now(), 10, 60_000);
    expect(released.map((j) => j.queueId)).toEqual([heldQ, heldQ]);
    expect(await again.claim(Date.now(), 10, 60_000)).toEqual([]);
    expect(await again.release({ kind: "message", queueId: late })).toBe(1);
    expect((await again.claim(Date.now(), 10, 60_000)).map((j) => j.queueId)).toEqual([late]);

    // everything, and an operator's mark still acts on a held recipient
    const all = await scheduled(q, 1, Date.now() - 10);
    expect(await q.hold({ kind: "all" })).toBe(1);
    expect(await q.claim(Date.now(), 10, 60_000)).toEqual([]);
    const [entry] = (await q.listScheduled()).filter((e) => e.queueId === all);
    expect(entry).toMatchObject({ held: true });
    expect(await q.deleteScheduled(entry!.id, { action: "drop" })).toBe("marked");
    expect((await q.claim(Date.now(), 10, 60_000)).map((j) => j.id)).toEqual([entry!.id]);
    await q.release({ kind: "all" });
    expect(await q.holds()).toEqual([]);
  });

  it("puts a released retry back at its own time when that is ahead, and due at the release when it passed", async () => {
    const q = new MailQueue(client());
    const now = Date.now();
    const passed = await scheduled(q, 1, now - 60_000);
    const ahead = await scheduled(q, 1, now + 3_600_000);
    expect(await q.hold({ kind: "all" }, now)).toBe(2);
    const releasedAt = now + 1000;
    expect(await q.release({ kind: "all" }, releasedAt)).toBe(2);
    const at = new Map((await q.listScheduled()).map((e) => [e.queueId, e.nextAttemptAt]));
    expect(at.get(passed)).toBe(new Date(releasedAt).toISOString());
    expect(at.get(ahead)).toBe(new Date(now + 3_600_000).toISOString());
    expect((await q.claim(releasedAt, 10, 60_000)).map((j) => j.queueId)).toEqual([passed]);
  });

  it("keeps a new message's first attempt aside as a held retry", async () => {
    const q = new MailQueue(client());
    const m = message();
    await q.createMessage(m, [remote("a@remote.test"), remote("b@remote.test")]);
    await q.hold({ kind: "destination", domain: "remote.test" });
    expect(await q.holdPending(m.queueId, ["r:a@remote.test", "r:b@remote.test", "r:nobody@x.test"])).toBe(2);
    expect(await q.holdPending(m.queueId, ["r:a@remote.test"])).toBe(0); // has its job already
    const list = await q.listScheduled();
    expect(list).toHaveLength(2);
    expect(list.every((e) => e.held && e.attempts === 0)).toBe(true);
    expect(await q.release({ kind: "destination", domain: "remote.test" })).toBe(2);
    const jobs = (await q.claim(Date.now(), 10, 60_000)) as RetryJob[];
    expect(jobs.map((j) => j.recipient.attempt)).toEqual([1, 1]);
  });

  it("keeps the schedule across a Redis restart (AOF)", async () => {
    const redis = client();
    const q = new MailQueue(redis);
    const due = Date.now() + 500;
    const queueId = await scheduled(q, 3, due);
    await server.restart();
    const list = await waitFor(() => q.listScheduled().catch(() => null), {
      timeoutMs: 15_000,
      message: "redis back",
    });
    expect(list.map((e) => e.queueId)).toEqual([queueId, queueId, queueId]);
    // the scripts are reloaded transparently (NOSCRIPT after the restart)
    const jobs = await q.claim(due + 1, 10, 60_000);
    expect(jobs).toHaveLength(3);
    expect((await q.getMessage(queueId))?.message.open).toBe(3);
  });
});

describe("waiting for a worker's result (watchdog)", () => {
  const noResult = { code: 451, enhanced: "4.4.7", text: "No delivery result reported" };

  it("indexes dispatched recipients until they are final or scheduled, and claims only the silent ones", async () => {
    const q = new MailQueue(client());
    const m = message();
    const t0 = Date.now() - 10_000;
    await q.createMessage(
      m,
      [
        remote("a@remote.test"),
        remote("b@remote.test"),
        remote("c@remote.test"),
        remote("gone@remote.test", { state: "bounced", lastReply: replies.noSuchUser() }),
      ],
      t0,
    );
    expect(await q.dispatchedAt(m.queueId, "r:a@remote.test")).toBe(t0);
    expect(await q.dispatchedAt(m.queueId, "r:gone@remote.test")).toBeNull();
    // b reported in time (delivered), c was deferred: neither waits for a result any more
    await q.finishRecipient(m.queueId, "r:b@remote.test", 1, "delivered", deferred(), { dsn: false });
    await q.scheduleRetry(m.queueId, "r:c@remote.test", 1, Date.now() + 3600_000, deferred(), {
      delayNotice: false,
    });
    expect(await q.dispatchedAt(m.queueId, "r:b@remote.test")).toBeNull();
    expect(await q.dispatchedAt(m.queueId, "r:c@remote.test")).toBeNull();

    const now = Date.now();
    expect(await q.claimStale(now, t0 - 1, 10, 60_000, noResult)).toEqual([]);
    const jobs = await q.claimStale(now, now - 5000, 10, 60_000, noResult);
    expect(jobs).toHaveLength(1);
    expect(jobs[0]).toMatchObject({
      id: `${m.queueId}:r:a@remote.test`,
      kind: "retry",
      queueId: m.queueId,
      receivedAt: m.receivedAt,
      traceparent: m.traceparent,
      stale: { dispatchedAt: new Date(t0).toISOString() },
      recipient: { rid: "r:a@remote.test", attempt: 2, state: "pending", lastReply: noResult },
    });
    expect(await q.claimStale(now, now, 10, 60_000, noResult)).toEqual([]);
    expect(await q.stats()).toMatchObject({ scheduled: 1, inFlight: 1 });

    // the silent attempt's late status is stale; the recipient is on attempt 2 now
    const late = await q.finishRecipient(m.queueId, "r:a@remote.test", 1, "delivered", deferred(), {
      dsn: false,
    });
    expect(late.status).toBe("stale");
    expect((await q.getRecipients(m.queueId, ["r:a@remote.test"]))[0]).toMatchObject({
      attempt: 2,
      state: "pending",
    });

    // attempt 2 published and acked: the recipient waits for its result from then on
    expect(await q.completeDispatched(jobs, now + 100)).toBe(1);
    expect(await q.dispatchedAt(m.queueId, "r:a@remote.test")).toBe(now + 100);
    expect(await q.stats()).toMatchObject({ scheduled: 1, inFlight: 0 });
    const done = await q.finishRecipient(m.queueId, "r:a@remote.test", 2, "delivered", deferred(), {
      dsn: false,
    });
    expect(done.status).toBe("ok");
    expect(await q.dispatchedAt(m.queueId, "r:a@remote.test")).toBeNull();
  });

  it("does not wait again for a recipient whose status arrived before its job was completed", async () => {
    const q = new MailQueue(client());
    const queueId = await scheduled(q, 2, Date.now() - 10);
    const jobs = (await q.claim(Date.now(), 10, 60_000)) as RetryJob[];
    expect(jobs).toHaveLength(2);
    const [a, b] = jobs as [RetryJob, RetryJob];
    // attempt 2 of a was delivered, of b deferred again, before the scheduler completed the jobs
    await q.finishRecipient(queueId, a.recipient.rid, 2, "delivered", deferred(), { dsn: false });
    await q.scheduleRetry(queueId, b.recipient.rid, 2, Date.now() + 60_000, deferred(), {
      delayNotice: false,
    });
    expect(await q.completeDispatched(jobs)).toBe(0);
    expect(await q.dispatchedAt(queueId, a.recipient.rid)).toBeNull();
    expect(await q.dispatchedAt(queueId, b.recipient.rid)).toBeNull();
    expect(await q.stats()).toMatchObject({ scheduled: 1, inFlight: 0 });
  });

  it("never gives one silent recipient to two concurrent watchdogs, and keeps the mark across a lost lease", async () => {
    const q = new MailQueue(client());
    const t0 = Date.now() - 60_000;
    const queueIds: string[] = [];
    for (let i = 0; i < 4; i++) {
      const m = message();
      queueIds.push(m.queueId);
      await q.createMessage(
        m,
        Array.from({ length: 25 }, (_, n) => remote(`user${n}@remote.test`, { seq: n })),
        t0,
      );
    }
    const claimers = [new MailQueue(client()), new MailQueue(client())];
    const got: string[][] = [[], []];
    await Promise.all(
      claimers.map(async (c, i) => {
        for (let round = 0; round < 100; round++) {
          const jobs = await c.claimStale(Date.now(), Date.now() - 1000, 7, 100, noResult);
          if (jobs.length === 0) break;
          for (const j of jobs) got[i]!.push(j.id);
        }
      }),
    );
    expect(got[0]!.length + got[1]!.length).toBe(100);
    expect(new Set([...got[0]!, ...got[1]!]).size).toBe(100);
    const state = await q.getMessage(queueIds[0]!);
    expect(state?.recipients.every((r) => r.attempt === 2)).toBe(true);

    // a watchdog that died after claiming: the job comes back as a retry, still marked
    expect(await q.releaseExpiredLeases(Date.now() + 1000)).toBe(100);
    const again = (await q.claim(Date.now() + 1000, 200, 60_000)) as RetryJob[];
    expect(again).toHaveLength(100);
    expect(again.every((j) => j.stale?.dispatchedAt === new Date(t0).toISOString())).toBe(true);
    expect(again.every((j) => j.recipient.attempt === 2)).toBe(true);
  });

  it("keeps each waiting recipient's request sequence until the wait ends", async () => {
    const redis = client();
    const q = new MailQueue(redis);
    const m = message();
    await q.createMessage(m, [remote("a@remote.test"), remote("b@remote.test"), remote("c@remote.test")]);
    // b reported before the router recorded the publish: nothing to record for it
    await q.finishRecipient(m.queueId, "r:b@remote.test", 1, "delivered", deferred(), { dsn: false });
    const recorded = await q.recordDispatch(m.queueId, [
      { rid: "r:a@remote.test", seq: 41 },
      { rid: "r:b@remote.test", seq: 41 },
      { rid: "r:c@remote.test", seq: 42 },
    ]);
    expect(recorded).toBe(2);
    expect(await q.dispatchSeq(m.queueId, "r:a@remote.test")).toBe(41);
    expect(await q.dispatchSeq(m.queueId, "r:b@remote.test")).toBeNull();
    expect(await q.staleCandidates(Date.now(), 10)).toEqual([
      expect.objectContaining({ id: `${m.queueId}:r:a@remote.test`, rid: "r:a@remote.test", seq: 41 }),
      expect.objectContaining({ id: `${m.queueId}:r:c@remote.test`, queueId: m.queueId, seq: 42 }),
    ]);

    // deferred: c has a retry job and waits for nothing; its sequence goes with its index entry
    await q.scheduleRetry(m.queueId, "r:c@remote.test", 1, Date.now() - 1, deferred(), {
      delayNotice: false,
    });
    expect(await q.dispatchSeq(m.queueId, "r:c@remote.test")).toBeNull();
    // re-dispatched as attempt 2 in the request at sequence 57
    const jobs = await q.claim(Date.now(), 10, 60_000);
    expect(await q.completeDispatched(jobs, Date.now(), new Map([[jobs[0]!.id, 57]]))).toBe(1);
    expect(await q.dispatchSeq(m.queueId, "r:c@remote.test")).toBe(57);

    // a claimed silent recipient waits for nothing until it is dispatched again
    const [stale] = await q.claimStale(Date.now(), Date.now(), 10, 60_000, noResult, [
      `${m.queueId}:r:a@remote.test`,
    ]);
    expect(stale?.recipient.rid).toBe("r:a@remote.test");
    expect(await q.dispatchSeq(m.queueId, "r:a@remote.test")).toBeNull();
    await q.completeDispatched([stale!], Date.now()); // its sequence unknown this time
    expect(await q.dispatchSeq(m.queueId, "r:a@remote.test")).toBeNull();
    expect(await q.dispatchedAt(m.queueId, "r:a@remote.test")).not.toBeNull();

    for (const rid of ["r:a@remote.test", "r:c@remote.test"]) {
      await q.finishRecipient(m.queueId, rid, 2, "delivered", deferred(), { dsn: false });
    }
    expect(await q.isFinished(m.queueId)).toBe(true);
    expect(await redis.zcard("mailpipe:dispatched")).toBe(0);
    expect(await redis.exists("mailpipe:dseq")).toBe(0);
  });

  it("claims only the given silent recipients, and none another watchdog found still queued", async () => {
    const q = new MailQueue(client());
    const m = message();
    const t0 = Date.now() - 10_000;
    await q.createMessage(m, [remote("a@remote.test"), remote("b@remote.test"), remote("c@remote.test")], t0);
    const id = (rid: string) => `${m.queueId}:${rid}`;
    const now = Date.now();
    // another replica saw b's request still in the stream and restarted its wait
    expect(await q.touchDispatched([id("r:b@remote.test")], now)).toBe(1);
    expect(await q.dispatchedAt(m.queueId, "r:b@remote.test")).toBe(now);
    // touching never brings back an entry that went, nor moves one back in time
    expect(await q.touchDispatched([id("r:x@remote.test")], now)).toBe(0);
    expect(await q.touchDispatched([id("r:b@remote.test")], now - 5000)).toBe(0);

    const jobs = await q.claimStale(now, now - 5000, 10, 60_000, noResult, [
      id("r:a@remote.test"),
      id("r:b@remote.test"),
    ]);
    expect(jobs.map((j) => j.id)).toEqual([id("r:a@remote.test")]);
    // c was not asked for; b waits again
    expect(await q.dispatchedAt(m.queueId, "r:c@remote.test")).toBe(t0);
    expect(await q.dispatchedAt(m.queueId, "r:b@remote.test")).toBe(now);
    expect(await q.claimStale(now, now - 5000, 10, 60_000, noResult, [])).toEqual([]);
  });

  it("drops index entries of recipients that need nothing any more", async () => {
    const redis = client();
    const q = new MailQueue(redis);
    const m = message();
    await q.createMessage(m, [remote("a@remote.test")], Date.now() - 10_000);
    // an entry left for a message whose state is gone
    await redis.zadd(
      "mailpipe:dispatched",
      Date.now() - 10_000,
      "01JZZZZZZZZZZZZZZZZZZZZZZZ:r:x@remote.test",
    );
    const done = await q.finishRecipient(m.queueId, "r:a@remote.test", 1, "delivered", deferred(), {
      dsn: false,
    });
    expect(done.status === "ok" && done.finalized).toBe(m.receivedAt);
    expect(await q.claimStale(Date.now(), Date.now(), 10, 60_000, noResult)).toEqual([]);
    expect(await redis.zcard("mailpipe:dispatched")).toBe(0);
  });
});
