import { createHash } from "node:crypto";
import { newQueueId, QueuedMail, replies, subjects, topology } from "@mailpipe/contracts";
import { waitFor } from "@mailpipe/testing";
import { simpleParser } from "mailparser";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  type Environment,
  MAIL_HOSTNAME,
  type Peers,
  parseDeliveryStatus,
  startEnvironment,
  startPeers,
  startTestRouter,
  type TestRouter,
} from "../test/harness.ts";

let env: Environment;
let router: TestRouter;
let peers: Peers;

beforeAll(async () => {
  env = await startEnvironment();
});
afterAll(async () => {
  await env?.stop();
});
beforeEach(async () => {
  await env.reset();
  router = await startTestRouter(env);
  peers = await startPeers(env);
});
afterEach(async () => {
  await router?.stop();
  await peers?.stop();
});

async function dsnReport(mailbox: string, count = 1) {
  const raws = await (async () => {
    for (let i = 0; i < 100; i++) {
      const found = await peers.dsnsFor(mailbox);
      if (found.length >= count) return found;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`no DSN for ${mailbox}`);
  })();
  const parsed = await simpleParser(raws[0]!, { keepDeliveryStatus: true });
  const status = parsed.attachments.find((a) => a.contentType === "message/delivery-status");
  const headers = parsed.attachments.find((a) => a.contentType === "text/rfc822-headers");
  return {
    raws,
    parsed,
    report: parseDeliveryStatus(status?.content.toString("utf8") ?? ""),
    headers: headers?.content.toString("utf8") ?? "",
  };
}

describe("routing queued mail", () => {
  it("fans local recipients and an alias out to exactly five mailboxes, passing a +tag folder through", async () => {
    const mail = await peers.queue({
      rcptTo: ["alice@example.test", "bob@example.test", "carol+work@example.test", "team@example.test"],
    });
    await peers.waitLocal((r) => r.queueId === mail.queueId, "the local request");
    await new Promise((r) => setTimeout(r, 300));
    const requests = peers.local.filter((r) => r.queueId === mail.queueId);
    const copies = requests.flatMap((r) => r.recipients);
    expect(copies.map((c) => c.mailbox).sort()).toEqual([
      "alice@example.test",
      "bob@example.test",
      "carol@example.test",
      "dave@example.test",
      "erin@example.test",
    ]);
    expect(copies.find((c) => c.mailbox === "carol@example.test")).toEqual({
      mailbox: "carol@example.test",
      address: "carol+work@example.test",
      folder: "work",
      attempt: 1,
    });
    expect(copies.every((c) => c.attempt === 1)).toBe(true);
    // the first attempt carries the body with it; the reference names the spool message
    expect(requests[0]).toMatchObject({
      mailFrom: "sender@other.test",
      body: { stream: "MAIL_SPOOL", seq: mail.spoolSeq, size: mail.body.size, sha256: mail.body.sha256 },
    });
    const carried = peers.attachments.get(requests[0]!.dispatchId);
    expect(carried?.toString()).toContain("Subject: Quarterly report");
    expect(createHash("sha256").update(carried!).digest("hex")).toBe(mail.body.sha256);
    expect(requests[0]!.dispatchId).toBe(`${mail.queueId}:local:1`);
    expect(peers.remote.filter((r) => r.queueId === mail.queueId)).toEqual([]);
    expect(await router.metric("router_routed_total", { kind: "local" })).toBe(5);

    const state = await router.queue.getMessage(mail.queueId);
    expect(state?.recipients.map((r) => r.state)).toEqual(Array(5).fill("pending"));
    expect(state?.message.traceparent).toMatch(/^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$/);
    expect(router.spans.getFinishedSpans().some((s) => s.name === "route")).toBe(true);
  });

  it("turns an alias to a remote address into a remote request carrying the alias as original", async () => {
    const mail = await peers.queue({ rcptTo: ["fwd@example.test"] });
    const req = await peers.waitRemote((r) => r.queueId === mail.queueId, "the forwarded request");
    expect(req.destination.domain).toBe("remote.test");
    expect(req.recipients).toEqual([
      { address: "friend@remote.test", original: "fwd@example.test", attempt: 1 },
    ]);
  });

  it("groups recipients of one domain into one request with the MX hosts in preference order", async () => {
    const mail = await peers.queue({
      rcptTo: ["one@remote.test", "two@remote.test", "someone@implicit.test"],
    });
    const req = await peers.waitRemote(
      (r) => r.queueId === mail.queueId && r.destination.domain === "remote.test",
      "the remote.test request",
    );
    expect(req.recipients.map((r) => r.address)).toEqual(["one@remote.test", "two@remote.test"]);
    expect(req.destination.hosts).toEqual([
      { exchange: "mx1.remote.test", priority: 10, addresses: ["127.0.0.2"] },
      { exchange: "mx2.remote.test", priority: 20, addresses: ["127.0.0.3"] },
    ]);
    expect(req).toMatchObject({ mailFrom: "sender@other.test", smtputf8: false, bodyType: "7BIT" });
    expect(req.dispatchId).toBe(`${mail.queueId}:remote_test:1`);

    const implicit = await peers.waitRemote(
      (r) => r.queueId === mail.queueId && r.destination.domain === "implicit.test",
      "the implicit MX request",
    );
    expect(implicit.destination.hosts).toEqual([
      { exchange: "implicit.test", priority: 0, addresses: ["127.0.0.4"] },
    ]);
    const dnsSpans = router.spans.getFinishedSpans().filter((s) => s.name === "dns.mx");
    expect(dnsSpans.map((s) => s.attributes["mail.recipient.domain"]).sort()).toEqual([
      "implicit.test",
      "remote.test",
    ]);
  });

  it("bounces null MX and NXDOMAIN at once with one DSN the sender can read", async () => {
    const mail = await peers.queue({
      mailFrom: "alice@example.test",
      rcptTo: ["x@nullmx.test", "y@nowhere.test"],
    });
    const { parsed, report, headers } = await dsnReport("alice@example.test");
    expect(parsed.subject).toBe("Undelivered Mail Returned to Sender");
    expect(parsed.from?.value[0]).toMatchObject({
      name: "Mail Delivery System",
      address: `MAILER-DAEMON@${MAIL_HOSTNAME}`,
    });
    expect(parsed.headers.get("auto-submitted")).toBe("auto-replied");
    expect(report.perMessage["reporting-mta"]).toBe(`dns; ${MAIL_HOSTNAME}`);
    const byRcpt = Object.fromEntries(report.recipients.map((r) => [r["final-recipient"], r]));
    expect(byRcpt["rfc822; x@nullmx.test"]).toMatchObject({
      action: "failed",
      status: "5.1.10",
      "diagnostic-code": "smtp; 556 5.1.10 Domain nullmx.test does not accept mail (null MX)",
    });
    expect(byRcpt["rfc822; y@nowhere.test"]).toMatchObject({
      action: "failed",
      status: "5.1.2",
      "diagnostic-code": "smtp; 550 5.1.2 Host or domain name not found: nowhere.test",
    });
    expect(headers).toContain(`Message-ID: <${mail.queueId}@other.test>`);
    expect(headers).not.toContain("The numbers are attached");

    const dsnRequest = peers.local.find((r) => r.mailFrom === "")!;
    expect(dsnRequest.recipients).toEqual([
      { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
    ]);
    expect(peers.remote.filter((r) => r.queueId === mail.queueId)).toEqual([]);
    expect(await router.metric("router_dsn_total", { kind: "failure" })).toBe(1);
  });

  it("bounces unknown local users (550 5.1.1) and alias loops (554 5.4.6)", async () => {
    await peers.queue({
      source: "msa",
      mailFrom: "bob@example.test",
      rcptTo: ["nobody@example.test", "loop1@example.test", "alice@example.test"],
    });
    const { report } = await dsnReport("bob@example.test");
    const byRcpt = Object.fromEntries(report.recipients.map((r) => [r["final-recipient"], r]));
    expect(Object.keys(byRcpt).sort()).toEqual(["rfc822; loop1@example.test", "rfc822; nobody@example.test"]);
    expect(byRcpt["rfc822; nobody@example.test"]).toMatchObject({ status: "5.1.1", action: "failed" });
    expect(byRcpt["rfc822; loop1@example.test"]?.["diagnostic-code"]).toMatch(/^smtp; 554 5\.4\.6 /);
    expect(peers.local.some((r) => r.recipients.some((c) => c.mailbox === "alice@example.test"))).toBe(true);
  });

  it("schedules a retry in Redis when the MX lookup fails temporarily (SERVFAIL)", async () => {
    const mail = await peers.queue({ rcptTo: ["someone@servfail.test"] });
    const [job] = await waitFor(async () => {
      const list = await router.queue.listScheduled();
      return list.length > 0 ? list : null;
    });
    expect(job).toMatchObject({
      queueId: mail.queueId,
      recipient: "someone@servfail.test",
      destination: "servfail.test",
      attempts: 1,
      lastReply: { code: 451, enhanced: "4.4.3" },
    });
    expect(Date.parse(job!.nextAttemptAt)).toBeGreaterThan(Date.now() - 2000);
    expect(peers.remote.filter((r) => r.queueId === mail.queueId)).toEqual([]);
  });

  it("routes a redelivered queued message once: same state, nothing new published", async () => {
    const mail = await peers.queue({ rcptTo: ["one@remote.test", "alice@example.test"] });
    await peers.waitRemote((r) => r.queueId === mail.queueId, "the first request");
    // the same message again, as JetStream redelivers it when an ack was lost
    await peers.queue({
      queueId: mail.queueId,
      rcptTo: ["one@remote.test", "alice@example.test"],
      msgId: `${mail.queueId}-again`,
    });
    await waitFor(
      async () =>
        (await router.metric("bus_messages_handled_total", { consumer: "router", outcome: "ack" })) === 2,
      { message: "the router handled both copies" },
    );
    await new Promise((r) => setTimeout(r, 300));
    expect(peers.remote.filter((r) => r.queueId === mail.queueId)).toHaveLength(1);
    expect(peers.local.filter((r) => r.queueId === mail.queueId)).toHaveLength(1);
    const state = await router.queue.getMessage(mail.queueId);
    expect(state?.message).toMatchObject({ open: 2, total: 2 });
    expect(state?.recipients.every((r) => r.attempt === 1 && r.state === "pending")).toBe(true);
  });

  it("sends a body kept in the Object Store (a large message) by reference, and deletes it when final", async () => {
    const mail = await peers.queue({ rcptTo: ["alice@example.test"], objectStore: true });
    const request = await peers.waitLocal((r) => r.queueId === mail.queueId, "the local request");
    expect(request.body).toEqual(mail.body);
    expect(peers.attachments.has(request.dispatchId)).toBe(false);
    const bodies = await peers.bus.bodies();
    expect((await bodies.readBuffer(request.body)).toString()).toContain("Subject: Quarterly report");
    await peers.status(request, "alice@example.test", "delivered", replies.delivered());
    await waitFor(async () => !(await peers.bodyExists(mail)), { message: "spool entry and body deleted" });
    expect("key" in mail.body && (await bodies.exists(mail.body.key))).toBe(false);
  });

  it("routes what the pre-spool work queue still holds after an upgrade", async () => {
    // a deployment upgraded from before the spool: MAIL_QUEUED (work queue) still holds a message
    const legacy = topology.legacyQueued;
    await peers.bus.jsm.streams.add({
      name: legacy.name,
      subjects: [...legacy.subjects],
      // the jetstream enums' values (the router does not depend on @nats-io/jetstream)
      retention: "workqueue" as never,
      storage: "file" as never,
    });
    const bodies = await peers.bus.bodies();
    const queueId = newQueueId();
    const raw = Buffer.from("Subject: from before the upgrade\r\n\r\nhello\r\n");
    const mail: QueuedMail = {
      v: 1,
      queueId,
      source: "mx",
      receivedAt: new Date().toISOString(),
      envelope: {
        mailFrom: "old@other.test",
        rcptTo: [{ address: "bob@example.test" }],
        smtputf8: false,
        bodyType: "7BIT",
      },
      body: await bodies.put(queueId, raw),
    };
    await peers.bus.publish(subjects.queuedLegacy(), QueuedMail, mail, { msgId: queueId });
    // the router binds the old queue when it starts and finds it
    const upgraded = await startTestRouter(env);
    try {
      const request = await peers.waitLocal((r) => r.queueId === queueId, "the request from the old queue");
      expect(request.body).toEqual(mail.body);
      expect((await bodies.readBuffer(request.body)).equals(raw)).toBe(true);
      await waitFor(async () => (await peers.bus.jsm.streams.info(legacy.name)).state.messages === 0, {
        message: "the old queue drained",
      });
    } finally {
      await upgraded.stop();
    }
  });
});
