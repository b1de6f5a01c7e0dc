// The watchdog: a recipient handed to a worker that never reports is dispatched again after
// STALE_DISPATCH, or expires with a DSN past QUEUE_LIFETIME. The test peers consume and ack
// every request and report only when a test tells them to, like a worker that lost the status.
// A request still waiting in MAIL_DELIVER is not lost and is never dispatched a second time.
import {
  type LocalDeliveryRequest,
  MailEvent,
  type RemoteDeliveryRequest,
  replies,
  reply,
  subjects,
} from "@mailpipe/contracts";
import { waitFor } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { simpleParser } from "mailparser";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  type Environment,
  type Peers,
  parseDeliveryStatus,
  startEnvironment,
  startPeers,
  startTestRouter,
  type TestRouter,
} from "../test/harness.ts";

let env: Environment;
let peers: Peers;
const routers: TestRouter[] = [];
let events: MailEvent[] = [];
let stopEvents: (() => void) | undefined;

beforeAll(async () => {
  env = await startEnvironment();
});
afterAll(async () => {
  await env?.stop();
});
beforeEach(async () => {
  await env.reset();
  peers = await startPeers(env);
  events = [];
  const sub = peers.bus.nc.subscribe(subjects.eventsAll());
  (async () => {
    for await (const m of sub) {
      const e = MailEvent.parse(m.json());
      if (e.type === "deferred") events.push(e);
    }
  })();
  stopEvents = () => sub.unsubscribe();
});
afterEach(async () => {
  for (const r of routers.splice(0)) await r.stop();
  stopEvents?.();
  await peers?.stop();
});

async function router(overrides: Record<string, string> = {}): Promise<TestRouter> {
  const r = await startTestRouter(env, { STALE_DISPATCH: "3s", ...overrides });
  routers.push(r);
  return r;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const attempts = (list: (LocalDeliveryRequest | RemoteDeliveryRequest)[], queueId: string, n: number) =>
  list.filter((q) => q.queueId === queueId && q.recipients[0]!.attempt === n);

/** The router's JSON log lines at warn level with this message. */
function warnings(r: TestRouter, text: string): Record<string, unknown>[] {
  return r.logs
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((l) => l.level === "warn" && String(l.msg).includes(text));
}

async function statusesHandled(r: TestRouter, count: number): Promise<void> {
  await waitFor(
    async () =>
      (await r.metric("bus_messages_handled_total", { consumer: "router-status", outcome: "ack" })) >= count,
    { message: `${count} status(es) handled` },
  );
}

describe("recipients no worker reported on", () => {
  it("dispatches a silent remote recipient again as attempt 2, ignores attempt 1's late status, and finishes on attempt 2's", async () => {
    const r = await router();
    const mail = await peers.queue({ mailFrom: "alice@example.test", rcptTo: ["one@remote.test"] });
    const first = await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1");
    const firstSeen = Date.now();

    const second = await peers.waitRemote(
      (q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 2,
      "attempt 2 after STALE_DISPATCH",
    );
    expect(Date.now() - firstSeen).toBeGreaterThanOrEqual(2500);
    expect(second.dispatchId).not.toBe(first.dispatchId);
    expect(second.destination.hosts.map((h) => h.exchange)).toEqual(["mx1.remote.test", "mx2.remote.test"]);
    expect(second.recipients).toEqual([{ address: "one@remote.test", attempt: 2 }]);

    const [warning] = warnings(r, "no delivery result reported");
    expect(warning).toMatchObject({ queueId: mail.queueId, recipient: "one@remote.test", attempt: 1 });
    expect(warning!.waitedSeconds).toBeGreaterThanOrEqual(3);
    const event = await waitFor(() => events.find((e) => e.queueId === mail.queueId), {
      message: "deferred event",
    });
    expect(event).toMatchObject({
      recipient: "one@remote.test",
      attempt: 1,
      destination: "remote.test",
      reply: { code: 451, enhanced: "4.4.7", text: "No delivery result reported, trying again" },
    });

    // attempt 1's status turns up late: a bounce that would otherwise end it with a DSN
    await peers.status(first, "one@remote.test", "bounced", reply(550, "5.1.1", "unknown"), 1);
    await statusesHandled(r, 1);
    expect((await r.queue.getMessage(mail.queueId))?.recipients[0]).toMatchObject({
      state: "pending",
      attempt: 2,
    });

    await peers.status(second, "one@remote.test", "delivered", replies.delivered());
    await waitFor(async () => !(await peers.bodyExists(mail)), { message: "body deleted" });
    expect(await r.queue.getMessage(mail.queueId)).toBeNull();
    expect(await r.metric("router_final_total", { state: "delivered" })).toBe(1);
    expect(await r.metric("router_final_total", { state: "bounced" })).toBe(0);
    expect(await r.metric("router_stale_redispatched_total", { kind: "remote" })).toBe(1);
    expect(await r.metric("router_stale_expired_total")).toBe(0);
    expect(await peers.dsnsFor("alice@example.test")).toEqual([]);
    expect(attempts(peers.remote, mail.queueId, 3)).toEqual([]);
  });

  it("never dispatches again a request still waiting in MAIL_DELIVER, and does once a worker acked it without reporting", async () => {
    // no worker for now: the requests stay in the stream, as with a backlog or every worker down
    await peers.stop();
    peers = await startPeers(env, { consume: false });
    const r = await router({ STALE_DISPATCH: "1500ms" });
    const mail = await peers.queue({ rcptTo: ["one@remote.test", "carol@example.test"] });
    const inStream = async () => (await peers.bus.jsm.streams.info("MAIL_DELIVER")).state.messages;
    await waitFor(async () => (await inStream()) === 2, { message: "two requests queued" });
    const firstWait = await r.queue.dispatchedAt(mail.queueId, "r:one@remote.test");
    expect(await r.queue.dispatchSeq(mail.queueId, "r:one@remote.test")).toBeGreaterThan(0);
    expect(await r.queue.dispatchSeq(mail.queueId, "l:carol@example.test")).toBeGreaterThan(0);

    await sleep(4000); // more than two STALE_DISPATCH periods
    expect(await inStream()).toBe(2);
    expect(await r.metric("router_stale_redispatched_total")).toBe(0);
    expect(await r.metric("router_stale_queued_total")).toBeGreaterThanOrEqual(4);
    expect(warnings(r, "no delivery result reported")).toEqual([]);
    const state = await r.queue.getMessage(mail.queueId);
    expect(state?.recipients.map((x) => [x.state, x.attempt])).toEqual([
      ["pending", 1],
      ["pending", 1],
    ]);
    // its wait started again: looked at anew one STALE_DISPATCH later
    expect(await r.queue.dispatchedAt(mail.queueId, "r:one@remote.test")).toBeGreaterThan(firstWait!);

    // a worker comes and acks both requests, but its statuses are lost
    await peers.stop();
    peers = await startPeers(env);
    await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1 (remote)");
    await peers.waitLocal((q) => q.queueId === mail.queueId, "attempt 1 (local)");
    const second = await peers.waitRemote(
      (q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 2,
      "remote attempt 2 once the request was gone",
    );
    const secondLocal = await peers.waitLocal(
      (q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 2,
      "local attempt 2 once the request was gone",
    );
    await peers.status(second, "one@remote.test", "delivered", replies.delivered());
    await peers.status(secondLocal, "carol@example.test", "delivered", replies.delivered());
    await waitFor(() => r.queue.isFinished(mail.queueId), { message: "message final" });
    expect(attempts(peers.remote, mail.queueId, 1)).toHaveLength(1);
    expect(attempts(peers.local, mail.queueId, 1)).toHaveLength(1);
    expect(await r.metric("router_stale_redispatched_total")).toBe(2);
    const redis = new Redis(env.redis.url);
    try {
      expect(await redis.exists("mailpipe:dseq")).toBe(0);
    } finally {
      redis.disconnect();
    }
  });

  it("dispatches a silent local recipient again as attempt 2, with its folder", async () => {
    const r = await router();
    const mail = await peers.queue({ rcptTo: ["carol+work@example.test"] });
    const first = await peers.waitLocal((q) => q.queueId === mail.queueId, "attempt 1");
    const second = await peers.waitLocal(
      (q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 2,
      "attempt 2 after STALE_DISPATCH",
    );
    expect(second.dispatchId).not.toBe(first.dispatchId);
    expect(second.recipients).toEqual([
      { mailbox: "carol@example.test", address: "carol+work@example.test", folder: "work", attempt: 2 },
    ]);
    expect(warnings(r, "no delivery result reported")[0]).toMatchObject({
      queueId: mail.queueId,
      recipient: "carol+work@example.test",
      kind: "local",
    });

    await peers.status(first, "carol@example.test", "delivered", replies.delivered(), 1);
    await statusesHandled(r, 1);
    expect((await r.queue.getMessage(mail.queueId))?.recipients[0]).toMatchObject({
      state: "pending",
      attempt: 2,
    });
    expect(await peers.bodyExists(mail)).toBe(true);

    await peers.status(second, "carol@example.test", "delivered", replies.delivered());
    await waitFor(async () => !(await peers.bodyExists(mail)), { message: "body deleted" });
    expect(await r.queue.isFinished(mail.queueId)).toBe(true);
    expect(await r.metric("router_stale_redispatched_total", { kind: "local" })).toBe(1);
    expect(await r.metric("router_final_total", { state: "delivered" })).toBe(1);
  });

  it("expires a silent recipient past QUEUE_LIFETIME with one failure DSN saying no result was reported", async () => {
    const r = await router({ QUEUE_LIFETIME: "2s" });
    const mail = await peers.queue({ mailFrom: "alice@example.test", rcptTo: ["slow@remote.test"] });
    await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1");

    const dsnRequest = await peers.waitLocal(
      (q) => q.mailFrom === "" && q.recipients[0]?.mailbox === "alice@example.test",
      "the failure DSN",
    );
    // the DSN itself is delivered (reported), so it is not dispatched again
    await peers.status(dsnRequest, "alice@example.test", "delivered", replies.delivered());
    const [raw] = await peers.dsnsFor("alice@example.test");
    const parsed = await simpleParser(raw!, { keepDeliveryStatus: true });
    const part = parsed.attachments.find((a) => a.contentType === "message/delivery-status");
    const report = parseDeliveryStatus(part?.content.toString("utf8") ?? "");
    expect(parsed.subject).toBe("Undelivered Mail Returned to Sender");
    expect(report.recipients).toEqual([
      expect.objectContaining({
        "final-recipient": "rfc822; slow@remote.test",
        action: "failed",
        status: "4.4.7",
        "diagnostic-code": "smtp; 451 4.4.7 No delivery result reported",
      }),
    ]);
    await waitFor(async () => !(await peers.bodyExists(mail)), { message: "body deleted" });

    await sleep(3500); // past another STALE_DISPATCH: nothing else goes out
    expect(peers.remote.filter((q) => q.queueId === mail.queueId)).toHaveLength(1);
    expect(peers.local.filter((q) => q.mailFrom === "")).toHaveLength(1);
    expect(await r.metric("router_stale_expired_total")).toBe(1);
    expect(await r.metric("router_stale_redispatched_total")).toBe(0);
    expect(await r.metric("router_final_total", { state: "expired" })).toBe(1);
    expect(warnings(r, "queue lifetime is over")[0]).toMatchObject({
      queueId: mail.queueId,
      recipient: "slow@remote.test",
    });
  });

  it("dispatches a silent recipient once when two routers watch", async () => {
    const settings = { STALE_DISPATCH: "2s", SCHEDULER_INTERVAL: "20ms" };
    const a = await router(settings);
    const b = await router(settings);
    const mails = [];
    for (let i = 0; i < 6; i++)
      mails.push(await peers.queue({ rcptTo: [`u${i}@remote.test`, "dave@example.test"] }));
    const ids = new Set(mails.map((m) => m.queueId));
    const seconds = await waitFor(
      () => {
        const remote = peers.remote.filter((q) => ids.has(q.queueId) && q.recipients[0]!.attempt === 2);
        const local = peers.local.filter((q) => ids.has(q.queueId) && q.recipients[0]!.attempt === 2);
        return remote.length >= 6 && local.length >= 6 ? [...remote, ...local] : null;
      },
      { timeoutMs: 15_000, message: "12 second attempts" },
    );
    for (const req of seconds) {
      const rcpt = req.recipients[0]!;
      await peers.status(
        req,
        "mailbox" in rcpt ? rcpt.mailbox : rcpt.address,
        "delivered",
        replies.delivered(),
      );
    }
    await waitFor(
      async () => {
        for (const m of ids) if (!(await a.queue.isFinished(m))) return false;
        return true;
      },
      { message: "every message final" },
    );
    const all = [...peers.remote, ...peers.local].filter((q) => ids.has(q.queueId));
    expect(all.filter((q) => q.recipients[0]!.attempt === 2)).toHaveLength(12);
    expect(all.filter((q) => q.recipients[0]!.attempt > 2)).toEqual([]);
    // every publish counts, including any JetStream would have deduplicated
    const redispatched = async (kind: string) =>
      (await a.metric("router_stale_redispatched_total", { kind })) +
      (await b.metric("router_stale_redispatched_total", { kind }));
    expect(await redispatched("remote")).toBe(6);
    expect(await redispatched("local")).toBe(6);
  });

  it("never fires while workers report in time, retries included", async () => {
    const r = await router({ STALE_DISPATCH: "2s", RETRY_SCHEDULE: "500ms" });
    const mails = [
      await peers.queue({ rcptTo: ["one@remote.test", "alice@example.test"] }),
      await peers.queue({ rcptTo: ["two@other.test"] }),
      await peers.queue({ rcptTo: ["bob@example.test", "team@example.test"] }),
      await peers.queue({ rcptTo: ["slow@remote.test"] }), // deferred once, then delivered
    ];
    const ids = new Set(mails.map((m) => m.queueId));
    const answered = new Set<string>();
    const deadline = Date.now() + 15_000;
    let done = false;
    // play workers that answer every request at once
    while (!done && Date.now() < deadline) {
      for (const req of [...peers.remote, ...peers.local]) {
        if (!ids.has(req.queueId) || answered.has(req.dispatchId)) continue;
        answered.add(req.dispatchId);
        for (const rcpt of req.recipients) {
          const who = "mailbox" in rcpt ? rcpt.mailbox : rcpt.address;
          if (who === "slow@remote.test" && rcpt.attempt === 1) {
            await peers.status(req, who, "deferred", reply(451, "4.4.1", "try later"));
          } else await peers.status(req, who, "delivered", replies.delivered());
        }
      }
      done = (await Promise.all([...ids].map((q) => r.queue.isFinished(q)))).every(Boolean);
      if (!done) await sleep(20);
    }
    expect(done).toBe(true);
    expect(await r.metric("router_retries_dispatched_total")).toBe(1);

    await sleep(4500); // two STALE_DISPATCH periods
    expect(await r.metric("router_stale_redispatched_total")).toBe(0);
    expect(await r.metric("router_stale_expired_total")).toBe(0);
    expect(warnings(r, "no delivery result reported")).toEqual([]);
    expect(events.filter((e) => ids.has(e.queueId ?? "") && e.reply?.enhanced === "4.4.7")).toEqual([]);
    expect(answered.size).toBe(peers.remote.length + peers.local.length);
    const redis = new Redis(env.redis.url);
    try {
      expect(await redis.zcard("mailpipe:dispatched")).toBe(0);
    } finally {
      redis.disconnect();
    }
  });
});
