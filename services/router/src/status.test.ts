import { replies, reply } from "@mailpipe/contracts";
import { waitFor } from "@mailpipe/testing";
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

beforeAll(async () => {
  env = await startEnvironment();
});
afterAll(async () => {
  await env?.stop();
});
beforeEach(async () => {
  await env.reset();
  peers = await startPeers(env);
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

const tempFailure = reply(451, "4.4.1", "Connection refused by mx1.remote.test");
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function reports(mailbox: string, count: number, timeoutMs = 10_000) {
  const raws = await waitFor(
    async () => {
      const found = await peers.dsnsFor(mailbox);
      return found.length >= count ? found : null;
    },
    { timeoutMs, message: `${count} DSN(s) for ${mailbox}` },
  );
  return Promise.all(
    raws.map(async (raw) => {
      const parsed = await simpleParser(raw, { keepDeliveryStatus: true });
      const status = parsed.attachments.find((a) => a.contentType === "message/delivery-status");
      return { parsed, report: parseDeliveryStatus(status?.content.toString("utf8") ?? "") };
    }),
  );
}

describe("worker statuses and retries", () => {
  it("retries a deferred recipient on schedule with attempts 2 and 3 in the message's trace, then delivers", async () => {
    const r = await router({ RETRY_SCHEDULE: "1s,1s" });
    const mail = await peers.queue({ rcptTo: ["one@remote.test"] });
    const first = await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1");
    await peers.status(first, "one@remote.test", "deferred", tempFailure);

    const [job] = await waitFor(async () => {
      const l = await r.queue.listScheduled();
      return l.length === 1 ? l : null;
    });
    expect(job).toMatchObject({
      queueId: mail.queueId,
      recipient: "one@remote.test",
      destination: "remote.test",
      attempts: 1,
      lastReply: tempFailure,
      receivedAt: mail.receivedAt,
    });
    const due = Date.parse(job!.nextAttemptAt) - Date.now();
    expect(due).toBeGreaterThan(0);
    expect(due).toBeLessThanOrEqual(1000);

    const second = await peers.waitRemote(
      (q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 2,
      "attempt 2",
    );
    expect(second.destination.hosts.map((h) => h.exchange)).toEqual(["mx1.remote.test", "mx2.remote.test"]);
    expect(second.dispatchId).not.toBe(first.dispatchId);
    await peers.status(second, "one@remote.test", "deferred", replies.mailboxFull());
    const [again] = await waitFor(async () => {
      const l = await r.queue.listScheduled();
      return l[0]?.attempts === 2 ? l : null;
    });
    expect(again?.lastReply).toEqual(replies.mailboxFull());

    const third = await peers.waitRemote(
      (q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 3,
      "attempt 3",
    );
    await peers.status(third, "one@remote.test", "delivered", replies.delivered("2.0.0 queued as X"));
    await waitFor(async () => (await r.queue.getMessage(mail.queueId)) === null, {
      message: "message final",
    });
    expect(peers.remote.filter((q) => q.queueId === mail.queueId)).toHaveLength(3);
    expect(await r.queue.listScheduled()).toEqual([]);
    expect(await r.metric("router_final_total", { state: "delivered" })).toBe(1);
    expect(await r.metric("router_retries_dispatched_total")).toBe(2);

    // later attempts join the trace the message was routed in
    const spans = r.spans.getFinishedSpans();
    const route = spans.find((s) => s.name === "route")!;
    const retries = spans.filter((s) => s.name === "retry");
    expect(retries).toHaveLength(2);
    for (const s of retries) expect(s.spanContext().traceId).toBe(route.spanContext().traceId);
    expect(spans.filter((s) => s.name === "schedule")).toHaveLength(2);
  });

  it("retries a local recipient whose mailbox is full, with its folder, until it fits", async () => {
    const r = await router({ RETRY_SCHEDULE: "1s" });
    const mail = await peers.queue({ rcptTo: ["carol+work@example.test"] });
    const first = await peers.waitLocal((q) => q.queueId === mail.queueId, "attempt 1");
    await peers.status(first, "carol@example.test", "deferred", replies.mailboxFull("carol@example.test"));
    const second = await peers.waitLocal(
      (q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 2,
      "attempt 2",
    );
    expect(second.recipients).toEqual([
      { mailbox: "carol@example.test", address: "carol+work@example.test", folder: "work", attempt: 2 },
    ]);
    // mda may report the copy's address instead of the mailbox
    await peers.status(second, "carol+work@example.test", "delivered", replies.delivered());
    await waitFor(async () => (await r.queue.getMessage(mail.queueId)) === null, { message: "final" });
  });

  it("ignores duplicate and stale statuses", async () => {
    const r = await router({ RETRY_SCHEDULE: "1h" });
    const mail = await peers.queue({ rcptTo: ["one@remote.test"] });
    const first = await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1");
    await peers.status(first, "one@remote.test", "deferred", tempFailure);
    // statuses are handled concurrently: the one that counts is in before the late ones arrive
    await waitFor(
      async () =>
        (await r.metric("bus_messages_handled_total", { consumer: "router-status", outcome: "ack" })) === 1,
      { message: "the first status handled" },
    );
    await peers.status(first, "one@remote.test", "deferred", tempFailure);
    await peers.status(first, "one@remote.test", "delivered", replies.delivered());
    await peers.status(first, "one@remote.test", "bounced", replies.noSuchUser());
    await waitFor(
      async () =>
        (await r.metric("bus_messages_handled_total", { consumer: "router-status", outcome: "ack" })) === 4,
      { message: "all four statuses handled" },
    );
    const state = await r.queue.getMessage(mail.queueId);
    expect(state?.recipients[0]).toMatchObject({ state: "pending", attempt: 2, lastReply: tempFailure });
    const list = await r.queue.listScheduled();
    expect(list).toHaveLength(1);
    expect(list[0]?.attempts).toBe(1);
    expect(await r.metric("router_retries_scheduled_total")).toBe(1);
  });

  it("sends one DSN to the sender for a 550 5.1.1 bounce", async () => {
    await router();
    const mail = await peers.queue({ mailFrom: "alice@example.test", rcptTo: ["gone@remote.test"] });
    const req = await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1");
    await peers.status(
      req,
      "gone@remote.test",
      "bounced",
      reply(550, "5.1.1", "<gone@remote.test>: unknown"),
    );
    const [dsn] = await reports("alice@example.test", 1);
    expect(dsn!.parsed.to).toMatchObject({ value: [{ address: "alice@example.test" }] });
    expect(dsn!.report.recipients).toEqual([
      expect.objectContaining({
        "final-recipient": "rfc822; gone@remote.test",
        action: "failed",
        status: "5.1.1",
        "remote-mta": "dns; mx1.remote.test",
        "diagnostic-code": "smtp; 550 5.1.1 <gone@remote.test>: unknown",
      }),
    ]);
    await sleep(800);
    expect(await peers.dsnsFor("alice@example.test")).toHaveLength(1);
  });

  it("reports two recipients bounced 100 ms apart in one DSN", async () => {
    const r = await router({ DSN_BATCH_DELAY: "1s" });
    const mail = await peers.queue({
      mailFrom: "alice@example.test",
      rcptTo: ["a@remote.test", "b@remote.test"],
    });
    const req = await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1");
    await peers.status(req, "a@remote.test", "bounced", reply(550, "5.1.1", "no a"));
    await sleep(100);
    await peers.status(req, "b@remote.test", "bounced", reply(550, "5.1.1", "no b"));
    const [dsn] = await reports("alice@example.test", 1);
    expect(dsn!.report.recipients.map((x) => x["final-recipient"]).sort()).toEqual([
      "rfc822; a@remote.test",
      "rfc822; b@remote.test",
    ]);
    await sleep(1500);
    expect(await peers.dsnsFor("alice@example.test")).toHaveLength(1);
    expect(await r.queue.getMessage(mail.queueId)).toBeNull();
  });

  it("never sends a DSN for a message from the null sender", async () => {
    const r = await router();
    const mail = await peers.queue({ mailFrom: "", rcptTo: ["x@remote.test"] });
    const req = await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1");
    await peers.status(req, "x@remote.test", "bounced", reply(550, "5.1.1", "no x"));
    await waitFor(async () => (await r.queue.getMessage(mail.queueId)) === null, { message: "final" });
    await sleep(800);
    expect(peers.local).toEqual([]);
    expect(await r.metric("router_dsn_total", { kind: "suppressed" })).toBe(1);
    expect(await r.metric("router_dsn_total", { kind: "failure" })).toBe(0);
    expect(r.logs.some((l) => l.includes("no DSN sent") && l.includes("null envelope sender"))).toBe(true);
  });

  it("routes a TLS report from delivery (source report, null sender) like any message, and bounces it to no one", async () => {
    const r = await router();
    const mail = await peers.queue({ source: "report", mailFrom: "", rcptTo: ["tlsrpt@remote.test"] });
    const req = await peers.waitRemote((q) => q.queueId === mail.queueId, "the report's request");
    expect(req).toMatchObject({ mailFrom: "", destination: { domain: "remote.test" } });
    expect(req.recipients.map((x) => x.address)).toEqual(["tlsrpt@remote.test"]);
    await peers.status(req, "tlsrpt@remote.test", "bounced", reply(550, "5.1.1", "no such report address"));
    await waitFor(async () => (await r.queue.getMessage(mail.queueId)) === null, { message: "final" });
    expect(await r.metric("router_dsn_total", { kind: "suppressed" })).toBe(1);
    expect(await r.metric("router_dsn_total", { kind: "failure" })).toBe(0);
  });

  it("sends a delay notice, then a failure DSN when the queue lifetime runs out", async () => {
    const r = await router({ RETRY_SCHEDULE: "1s", QUEUE_LIFETIME: "4s", DELAY_WARNING: "1s" });
    const mail = await peers.queue({ mailFrom: "alice@example.test", rcptTo: ["slow@remote.test"] });
    const answered = new Set<string>();
    const deadline = Date.now() + 20_000;
    // play a destination that always answers 4xx, until the sender got the failure report
    while (Date.now() < deadline) {
      for (const req of peers.remote.filter((q) => q.queueId === mail.queueId)) {
        if (answered.has(req.dispatchId)) continue;
        answered.add(req.dispatchId);
        await peers.status(req, "slow@remote.test", "deferred", tempFailure);
      }
      if ((await peers.dsnsFor("alice@example.test")).length >= 2) break;
      await sleep(50);
    }
    const [delay, failure] = await reports("alice@example.test", 2);
    expect(delay!.parsed.subject).toBe("Delayed Mail (still being retried)");
    expect(delay!.report.recipients[0]).toMatchObject({
      "final-recipient": "rfc822; slow@remote.test",
      action: "delayed",
      status: "4.4.1",
      "diagnostic-code": "smtp; 451 4.4.1 Connection refused by mx1.remote.test",
    });
    const until = Date.parse(delay!.report.recipients[0]!["will-retry-until"]!);
    expect(Math.abs(until - (Date.parse(mail.receivedAt) + 4000))).toBeLessThan(1500);

    expect(failure!.parsed.subject).toBe("Undelivered Mail Returned to Sender");
    expect(failure!.report.recipients[0]).toMatchObject({
      "final-recipient": "rfc822; slow@remote.test",
      action: "failed",
      status: "4.4.7",
      "diagnostic-code": "smtp; 451 4.4.1 Connection refused by mx1.remote.test",
    });
    await waitFor(async () => (await r.queue.getMessage(mail.queueId)) === null, { message: "final" });
    expect(await r.metric("router_final_total", { state: "expired" })).toBe(1);
    expect(answered.size).toBeGreaterThanOrEqual(2);
  });

  it("deletes the body once every recipient is final, not before", async () => {
    const r = await router();
    const mail = await peers.queue({ rcptTo: ["one@remote.test", "alice@example.test"] });
    const remote = await peers.waitRemote((q) => q.queueId === mail.queueId, "remote request");
    const local = await peers.waitLocal((q) => q.queueId === mail.queueId, "local request");
    await peers.status(remote, "one@remote.test", "delivered", replies.delivered());
    await waitFor(async () => (await r.queue.getMessage(mail.queueId))?.message.open === 1, {
      message: "remote recipient final",
    });
    await sleep(500); // several scheduler rounds
    expect(await peers.bodyExists(mail)).toBe(true);

    await peers.status(local, "alice@example.test", "delivered", replies.delivered());
    await waitFor(async () => !(await peers.bodyExists(mail)), { message: "body deleted" });
    expect(await r.queue.getMessage(mail.queueId)).toBeNull();
    expect(await r.queue.isFinished(mail.queueId)).toBe(true);
  });

  it("acts on mailctl marks: bounce sends a DSN, drop ends the recipient silently", async () => {
    const r = await router({ RETRY_SCHEDULE: "1h" });
    const mail = await peers.queue({
      mailFrom: "alice@example.test",
      rcptTo: ["a@remote.test", "b@remote.test"],
    });
    const req = await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1");
    await peers.status(req, "a@remote.test", "deferred", tempFailure);
    await peers.status(req, "b@remote.test", "deferred", tempFailure);
    const jobs = await waitFor(async () => {
      const l = await r.queue.listScheduled();
      return l.length === 2 ? l : null;
    });
    const a = jobs.find((j) => j.recipient === "a@remote.test")!;
    const b = jobs.find((j) => j.recipient === "b@remote.test")!;
    expect(await r.queue.deleteScheduled(a.id, { action: "bounce" })).toBe("marked");
    expect(await r.queue.deleteScheduled(b.id, { action: "drop" })).toBe("marked");

    const [dsn] = await reports("alice@example.test", 1);
    expect(dsn!.report.recipients).toHaveLength(1);
    expect(dsn!.report.recipients[0]).toMatchObject({
      "final-recipient": "rfc822; a@remote.test",
      status: "5.0.0",
    });
    await waitFor(async () => (await r.queue.getMessage(mail.queueId)) === null, { message: "final" });
    expect(peers.remote.filter((q) => q.queueId === mail.queueId)).toHaveLength(1);
  });
});
