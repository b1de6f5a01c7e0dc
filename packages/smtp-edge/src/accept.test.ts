import { type MailEvent, newQueueId, replies, SmtpError, subjects } from "@mailpipe/contracts";
import { SpanKind } from "@mailpipe/telemetry";
import { type NatsHandle, startNats, waitFor } from "@mailpipe/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type EdgeHarness, openData, startEdge } from "../test/harness.ts";
import { ATTACH_MAX, acceptMessage } from "./accept.ts";

let nats: NatsHandle;
let h: EdgeHarness;
const events: MailEvent[] = [];
const acceptedCalls: { queueId: string; size: number }[] = [];

beforeAll(async () => {
  nats = await startNats();
  h = await startEdge(nats.url, {
    hooks: {
      rcptTo: (_tx, r) => {
        if (!r.address.endsWith("@example.test")) throw new SmtpError(replies.relayDenied());
      },
      message: () => ({ prepend: ["Authentication-Results: mx.test; none"] }),
      accepted: (_tx, a) => {
        acceptedCalls.push(a);
        throw new Error("bookkeeping failed");
      },
    },
  });
  const sub = h.bus.nc.subscribe(subjects.eventsAll());
  void (async () => {
    for await (const m of sub) events.push(m.json<MailEvent>());
  })();
});
afterAll(async () => {
  await h?.close();
  await nats?.stop();
});

describe("durable acceptance", () => {
  it("stores Received + prepended fields + the message, publishes it and then answers 250", async () => {
    const c = await h.connect();
    await openData(c, "Sender@Remote.TEST", ["alice@example.test"]);
    const message = "Message-ID: <m1@remote.test>\r\nSubject: hello\r\n\r\nbody line\r\n";
    c.write(`${message}.\r\n`);
    const r = await c.read();
    expect(r).toMatchObject({ code: 250, enhanced: "2.0.0" });
    const queueId = /queued as (\S+)$/.exec(r.text)![1]!;
    await c.command("QUIT");
    c.close();

    const q = await waitFor(() => h.queued.find((m) => m.queueId === queueId), { timeoutMs: 5000 });
    expect(q).toMatchObject({
      v: 1,
      source: "mx",
      messageId: "<m1@remote.test>",
      envelope: {
        mailFrom: "Sender@remote.test",
        rcptTo: [{ address: "alice@example.test" }],
        smtputf8: false,
        bodyType: "7BIT",
      },
      client: { ip: "127.0.0.1", helo: "client.test", tls: false },
      // small bodies travel inside the spool message: one JetStream write for everything
      body: { attached: true },
    });
    const stored = (await h.body(q)).toString();
    const [received, rest] = [stored.slice(0, stored.indexOf("Authentication-Results:")), stored];
    expect(received).toMatch(
      new RegExp(
        `^Received: from client\\.test \\(\\[127\\.0\\.0\\.1\\]\\)\\r\\n\\tby mx\\.test \\(mailpipe\\) with ESMTP id ${queueId}\\r\\n\\tfor <alice@example\\.test>; .+ \\+0000\\r\\n$`,
      ),
    );
    expect(rest.endsWith(`Authentication-Results: mx.test; none\r\n${message}`)).toBe(true);
    expect(q.body.size).toBe(Buffer.byteLength(stored));
    // the accepted hook ran with the stored size; its failure did not change the 250
    expect(acceptedCalls).toContainEqual({ queueId, size: q.body.size });

    await waitFor(() => events.some((e) => e.type === "queued" && e.queueId === queueId), {
      timeoutMs: 3000,
    });
    const received_ = events.find((e) => e.type === "received" && e.queueId === queueId);
    expect(received_).toMatchObject({
      service: "mx",
      mailFrom: "Sender@remote.test",
      recipients: ["alice@example.test"],
      messageId: "<m1@remote.test>",
      client: { ip: "127.0.0.1", helo: "client.test" },
    });
    expect(received_?.traceId).toMatch(/^[0-9a-f]{32}$/);
  });

  it("traces one transaction as one trace, linked to its session, without local parts", async () => {
    h.spans.reset();
    const c = await h.connect();
    await openData(c, "someone@remote.test", ["alice@example.test", "bob@example.test"]);
    c.write("Subject: traced\r\n\r\nx\r\n.\r\n");
    const r = await c.read();
    const queueId = /queued as (\S+)$/.exec(r.text)![1]!;
    await c.command("QUIT");
    c.close();
    const tx = await waitFor(
      () =>
        h.spans
          .getFinishedSpans()
          .find((s) => s.name === "smtp.transaction" && s.attributes["mail.queue_id"] === queueId),
      { timeoutMs: 3000 },
    );
    expect(tx.links).toHaveLength(1);
    const session = await waitFor(
      () =>
        h.spans
          .getFinishedSpans()
          .find((s) => s.name === "smtp.session" && s.spanContext().spanId === tx.links[0]!.context.spanId),
      { timeoutMs: 3000, message: "the linked session span" },
    );
    const spans = h.spans.getFinishedSpans();
    expect(tx.kind).toBe(SpanKind.SERVER);
    expect(tx.parentSpanContext).toBeUndefined();
    expect(tx.spanContext().traceId).not.toBe(session.spanContext().traceId);
    expect(session.attributes["client.address"]).toBe("127.0.0.1");
    expect(tx.attributes).toMatchObject({
      "mail.queue_id": queueId,
      "client.address": "127.0.0.1",
      "mail.recipient.count": 2,
      "mail.recipient.domain": ["example.test"],
      "smtp.reply.code": 250,
      "smtp.reply.enhanced_code": "2.0.0",
      "smtp.tls": false,
    });
    const inTrace = spans
      .filter((s) => s.spanContext().traceId === tx.spanContext().traceId)
      .map((s) => s.name);
    for (const name of ["smtp.mail", "smtp.rcpt", "smtp.data", `send ${subjects.queued()}`]) {
      expect(inTrace).toContain(name);
    }
    expect(inTrace).not.toContain("body.store");
    const producer = spans.find((s) => s.name === `send ${subjects.queued()}`)!;
    expect(producer.kind).toBe(SpanKind.PRODUCER);
    const everything = JSON.stringify(spans.map((s) => s.attributes));
    for (const local of ["someone", "alice", "bob", "traced"]) expect(everything).not.toContain(local);
  });

  it("emits a rejected event carrying the queue ID for a refused recipient", async () => {
    const c = await h.connect();
    await c.command("EHLO client.test");
    await c.command("MAIL FROM:<x@remote.test>");
    expect(await c.command("RCPT TO:<victim@elsewhere.test>")).toMatchObject({
      code: 550,
      enhanced: "5.7.1",
    });
    c.close();
    const rejected = await waitFor(
      () => events.find((e) => e.type === "rejected" && e.recipient === "victim@elsewhere.test"),
      { timeoutMs: 3000 },
    );
    expect(rejected.queueId).toMatch(/^[0-9A-Z]{26}$/);
    expect(rejected.reply).toMatchObject({ code: 550, enhanced: "5.7.1" });
  });

  it("counts replies, sessions and messages in the metrics", async () => {
    const text = await h.telemetry.metrics.text();
    expect(text).toMatch(/mailpipe_smtp_replies_total\{code="250",service="mx"\} \d+/);
    expect(text).toMatch(/mailpipe_smtp_replies_total\{code="550",service="mx"\} 1/);
    expect(text).toMatch(/mailpipe_smtp_messages_total\{result="accepted",service="mx"\} [1-9]/);
    expect(text).toMatch(/mailpipe_smtp_sessions_total\{service="mx"\} [1-9]/);
    expect(text).toMatch(/mailpipe_smtp_message_bytes_count\{service="mx"\} [1-9]/);
    expect(text).toMatch(/mailpipe_smtp_sessions_active\{service="mx"\} \d/);
  });
  it("puts a body over ATTACH_MAX into the Object Store first and spools a reference to it", async () => {
    const queueId = newQueueId();
    const big = Buffer.alloc(ATTACH_MAX + 1000, "a");
    const accepted = await acceptMessage({
      bus: h.bus,
      telemetry: h.telemetry,
      queueId,
      source: "mx",
      envelope: { mailFrom: "", rcptTo: [{ address: "a@example.test" }], smtputf8: false, bodyType: "7BIT" },
      prepend: "Received: by test\r\n",
      chunks: [Buffer.from("Subject: big\r\n\r\n"), big],
    });
    expect(accepted.body).toMatchObject({ bucket: "mail-bodies", key: queueId });
    const q = await waitFor(() => h.queued.find((m) => m.queueId === queueId), { timeoutMs: 5000 });
    expect(q.body).toEqual(accepted.body);
    const stored = await h.body(q);
    expect(stored.length).toBe(accepted.body.size);
    expect(stored.subarray(0, 40).toString()).toMatch(/^Received: by test\r\nSubject: big\r\n\r\naaaa/);
  });
});

describe("when NATS is down", () => {
  it("answers 451 4.3.0 (never 250) and accepts again once NATS is back", async () => {
    const before = h.queued.length;
    const c = await h.connect();
    await openData(c);
    await nats.kill();
    c.write("Subject: during outage\r\n\r\nx\r\n.\r\n");
    const r = await c.read(15_000);
    expect(r).toMatchObject({ code: 451, enhanced: "4.3.0" });
    expect(h.logs.some((l) => l.includes("could not store and queue the message"))).toBe(true);

    await nats.restart();
    await waitFor(() => h.bus.connected, { timeoutMs: 10_000, message: "bus reconnected" });
    await c.command("MAIL FROM:<again@remote.test>");
    await c.command("RCPT TO:<alice@example.test>");
    await c.command("DATA");
    c.write("Subject: after outage\r\n\r\nx\r\n.\r\n");
    expect(await c.read(15_000)).toMatchObject({ code: 250, enhanced: "2.0.0" });
    await waitFor(() => h.queued.length === before + 1, { timeoutMs: 10_000 });
    expect(h.queued.at(-1)!.envelope.mailFrom).toBe("again@remote.test");
    c.close();
  });

  it("acceptMessage itself throws SmtpError 451 4.3.0", async () => {
    await nats.kill();
    try {
      const err = await acceptMessage({
        bus: h.bus,
        telemetry: h.telemetry,
        queueId: newQueueId(),
        source: "msa",
        envelope: {
          mailFrom: "",
          rcptTo: [{ address: "a@example.test" }],
          smtputf8: false,
          bodyType: "7BIT",
        },
        prepend: "",
        chunks: [Buffer.from("Subject: x\r\n\r\ny\r\n")],
        timeoutMs: 3000,
      }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SmtpError);
      expect((err as SmtpError).reply).toEqual(replies.localError());
    } finally {
      await nats.restart();
    }
  });
});
