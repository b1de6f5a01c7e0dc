import { createHash, randomBytes } from "node:crypto";
import { Writable } from "node:stream";
import {
  type LocalDeliveryRequest,
  LocalDeliveryRequest as LocalSchema,
  newQueueId,
  QueuedMail,
  subjects,
  topology,
} from "@mailpipe/contracts";
import { createTelemetry, InMemorySpanExporter, type Telemetry } from "@mailpipe/telemetry";
import { type NatsHandle, startNats, waitFor } from "@mailpipe/testing";
import { Objm } from "@nats-io/obj";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { BodyIntegrityError, BodyNotFoundError, Bus, BusConnectError, outcome } from "./index.ts";

let nats: NatsHandle;
const open: Bus[] = [];

beforeAll(async () => {
  nats = await startNats();
});
afterAll(async () => {
  await nats?.stop();
});
afterEach(async () => {
  await Promise.all(open.splice(0).map((b) => b.close().catch(() => {})));
  // a clean slate for the next test: purge what a test left behind
  const admin = await connect("router");
  for (const s of Object.values(topology.streams)) await admin.jsm.streams.purge(s.name).catch(() => {});
  for (const c of Object.values(topology.consumers))
    await admin.jsm.consumers.delete(c.stream, c.durable).catch(() => {});
  await admin.close();
});

function quietTelemetry(service: "router" | "mda", exporter?: InMemorySpanExporter): Telemetry {
  const sink = new Writable({ write: (_c, _e, cb) => cb() });
  return createTelemetry({
    service,
    logDestination: sink,
    defaultMetrics: false,
    ...(exporter ? { spanExporter: exporter } : {}),
  });
}

async function connect(service: "router" | "mda", exporter?: InMemorySpanExporter): Promise<Bus> {
  const bus = await Bus.connect({
    url: nats.url,
    name: `test-${service}`,
    telemetry: quietTelemetry(service, exporter),
  });
  await bus.ensureTopology();
  return bus;
}

function request(): LocalDeliveryRequest {
  const queueId = newQueueId();
  return {
    v: 1,
    queueId,
    dispatchId: `${queueId}.local.1`,
    receivedAt: new Date().toISOString(),
    mailFrom: "sender@remote.test",
    recipients: [{ mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 }],
    body: { bucket: "mail-bodies", key: queueId, size: 1, sha256: "0".repeat(64) },
  };
}

describe("bus", () => {
  it("continues the publisher's trace in the consumer across two connections", async () => {
    const pubSpans = new InMemorySpanExporter();
    const subSpans = new InMemorySpanExporter();
    const publisher = await connect("router", pubSpans);
    const consumer = await connect("mda", subSpans);
    open.push(publisher, consumer);

    const got: LocalDeliveryRequest[] = [];
    await consumer.consume("mda", LocalSchema, (m) => {
      got.push(m);
    });
    const msg = request();
    await publisher.publish(subjects.deliverLocal(), LocalSchema, msg, { msgId: msg.dispatchId });
    await waitFor(() => got.length === 1 && subSpans.getFinishedSpans().length > 0, { timeoutMs: 5000 });

    expect(got[0]).toEqual(msg);
    const send = pubSpans.getFinishedSpans().find((s) => s.name === "send mail.v1.deliver.local")!;
    const process = subSpans.getFinishedSpans().find((s) => s.name === "process mail.v1.deliver.local")!;
    expect(send).toBeDefined();
    expect(process).toBeDefined();
    expect(process.spanContext().traceId).toBe(send.spanContext().traceId);
    expect(process.parentSpanContext?.spanId).toBe(send.spanContext().spanId);
    expect(process.attributes["mail.queue_id"]).toBe(msg.queueId);
  });

  it("carries an attachment after the JSON in one payload, as a view the handler gets with the sequence", async () => {
    const bus = await connect("mda");
    open.push(bus);
    const got: { m: LocalDeliveryRequest; attachment?: Buffer; seq: number; stream: string }[] = [];
    await bus.consume("mda", LocalSchema, (m, ctx) => {
      got.push({
        m,
        seq: ctx.seq,
        stream: ctx.stream,
        ...(ctx.attachment ? { attachment: Buffer.from(ctx.attachment) } : {}),
      });
    });
    const bytes = randomBytes(3000);
    const withBody = request();
    const plain = request();
    const ack = await bus.publish(subjects.deliverLocal(), LocalSchema, withBody, {
      msgId: withBody.dispatchId,
      attachment: [bytes.subarray(0, 1000), bytes.subarray(1000)],
    });
    await bus.publish(subjects.deliverLocal(), LocalSchema, plain, { msgId: plain.dispatchId });
    await waitFor(() => got.length === 2, { timeoutMs: 5000 });
    const first = got.find((g) => g.m.queueId === withBody.queueId)!;
    expect(first.m).toEqual(withBody);
    expect(first.attachment?.equals(bytes)).toBe(true);
    expect(first).toMatchObject({ seq: ack.seq, stream: topology.streams.deliver.name });
    expect(got.find((g) => g.m.queueId === plain.queueId)?.attachment).toBeUndefined();
  });

  it("stores a message published twice with the same id once", async () => {
    const bus = await connect("router");
    open.push(bus);
    const msg = request();
    const first = await bus.publish(subjects.deliverLocal(), LocalSchema, msg, { msgId: msg.dispatchId });
    const second = await bus.publish(subjects.deliverLocal(), LocalSchema, msg, { msgId: msg.dispatchId });
    expect(first.duplicate).toBe(false);
    expect(second.duplicate).toBe(true);
    const info = await bus.jsm.streams.info(topology.streams.deliver.name);
    expect(info.state.messages).toBe(1);
  });

  it("fails a publish no stream takes at once, and one nothing acknowledges after its timeout", async () => {
    const bus = await connect("router");
    open.push(bus);
    const msg = request();
    // the server answers "no responders": the error says so (a timeout would read differently)
    await expect(
      bus.publish("nobody.listens.here", LocalSchema, msg, { msgId: msg.dispatchId, timeoutMs: 5000 }),
    ).rejects.toThrow(/publishing to nobody.listens.here failed: no JetStream stream takes this subject/);
    // a plain subscriber takes the message but never acknowledges it like a stream would
    const silent = bus.nc.subscribe("silent.subject");
    await expect(
      bus.publish("silent.subject", LocalSchema, msg, { msgId: msg.dispatchId, timeoutMs: 300 }),
    ).rejects.toThrow(/did not acknowledge the publish in time/);
    silent.unsubscribe();
  });

  it("refuses to publish a message that breaks its contract", async () => {
    const bus = await connect("router");
    open.push(bus);
    const bad = { ...request(), queueId: "nope" };
    await expect(bus.publish(subjects.deliverLocal(), LocalSchema, bad, { msgId: "x" })).rejects.toThrow(
      /invalid message for mail.v1.deliver.local: queueId/,
    );
  });

  it("redelivers after the delay of a nak, never after a term", async () => {
    const bus = await connect("mda");
    open.push(bus);
    const retried = request();
    const termed = request();
    const seen: { id: string; at: number; count: number }[] = [];
    await bus.consume(
      "mda",
      LocalSchema,
      (m, ctx) => {
        seen.push({ id: m.queueId, at: Date.now(), count: ctx.deliveryCount });
        if (m.queueId === termed.queueId) return outcome.term("poison");
        return ctx.deliveryCount === 1 ? outcome.retry(1500) : outcome.ack();
      },
      { ackWaitMs: 1000 },
    );
    await bus.publish(subjects.deliverLocal(), LocalSchema, retried, { msgId: retried.dispatchId });
    await bus.publish(subjects.deliverLocal(), LocalSchema, termed, { msgId: termed.dispatchId });
    await waitFor(() => seen.filter((s) => s.id === retried.queueId).length === 2, { timeoutMs: 8000 });
    const [a, b] = seen.filter((s) => s.id === retried.queueId);
    expect(b!.count).toBe(2);
    expect(b!.at - a!.at).toBeGreaterThanOrEqual(1400);
    // well past the ack wait: the terminated message never came back
    await new Promise((r) => setTimeout(r, 2500));
    expect(seen.filter((s) => s.id === termed.queueId)).toHaveLength(1);
    const info = await bus.jsm.consumers.info(topology.consumers.mda.stream, topology.consumers.mda.durable);
    expect(info.num_ack_pending).toBe(0);
    expect(info.num_pending).toBe(0);
  });

  it("gives a message whose handler died without acking to another consumer after the ack wait", async () => {
    const crashing = await connect("mda");
    const started: number[] = [];
    await crashing.consume(
      "mda",
      LocalSchema,
      () => {
        started.push(Date.now());
        return new Promise<void>(() => {}); // never settles, like a process that hung or died
      },
      { ackWaitMs: 1500, heartbeatForMs: 0 },
    );
    const publisher = await connect("router");
    open.push(publisher);
    const msg = request();
    await publisher.publish(subjects.deliverLocal(), LocalSchema, msg, { msgId: msg.dispatchId });
    await waitFor(() => started.length === 1, { timeoutMs: 5000 });
    await crashing.nc.close(); // the crash: gone without an ack

    const second = await connect("mda");
    open.push(second);
    const got: { id: string; count: number; at: number }[] = [];
    await second.consume(
      "mda",
      LocalSchema,
      (m, ctx) => {
        got.push({ id: m.queueId, count: ctx.deliveryCount, at: Date.now() });
      },
      { ackWaitMs: 1500 },
    );
    await waitFor(() => got.length === 1, { timeoutMs: 8000 });
    expect(got[0]!.id).toBe(msg.queueId);
    expect(got[0]!.count).toBe(2);
    expect(got[0]!.at - started[0]!).toBeGreaterThanOrEqual(1400);
  });

  it("terminates a message that does not match the consumer's contract instead of looping on it", async () => {
    const bus = await connect("mda");
    open.push(bus);
    const calls: unknown[] = [];
    await bus.consume(
      "mda",
      LocalSchema,
      (m) => {
        calls.push(m);
      },
      { ackWaitMs: 1000 },
    );
    await bus.js.publish(subjects.deliverLocal(), JSON.stringify({ v: 1, nonsense: true }), {
      msgID: "garbage",
    });
    const good = request();
    await bus.publish(subjects.deliverLocal(), LocalSchema, good, { msgId: good.dispatchId });
    await waitFor(() => calls.length === 1, { timeoutMs: 5000 });
    await waitFor(async () => (await bus.jsm.consumers.info("MAIL_DELIVER", "mda")).num_ack_pending === 0, {
      timeoutMs: 5000,
    });
    const info = await bus.jsm.streams.info("MAIL_DELIVER");
    expect(info.state.messages).toBe(0);
    expect(calls).toHaveLength(1);
  });

  it("takes a message with fields a newer version added, without those fields (a rolling upgrade)", async () => {
    const bus = await connect("mda");
    open.push(bus);
    const calls: unknown[] = [];
    await bus.consume("mda", LocalSchema, (m) => {
      calls.push(m);
    });
    const newer = request();
    // what a later router might write: a new top-level field and a new field on a recipient
    const written = {
      ...newer,
      priority: "high",
      recipients: newer.recipients.map((r) => ({ ...r, notify: ["SUCCESS"] })),
    };
    await bus.js.publish(subjects.deliverLocal(), JSON.stringify(written), { msgID: newer.dispatchId });
    await waitFor(() => calls.length === 1, { timeoutMs: 5000 });
    expect(calls[0]).toEqual(newer);
    await waitFor(async () => (await bus.jsm.consumers.info("MAIL_DELIVER", "mda")).num_ack_pending === 0, {
      timeoutMs: 5000,
    });
    expect((await bus.jsm.streams.info("MAIL_DELIVER")).state.messages).toBe(0);
  });

  it("waits for handlers in flight when a subscription stops", async () => {
    const bus = await connect("mda");
    open.push(bus);
    let finished = false;
    const sub = await bus.consume("mda", LocalSchema, async () => {
      await new Promise((r) => setTimeout(r, 800));
      finished = true;
    });
    const msg = request();
    await bus.publish(subjects.deliverLocal(), LocalSchema, msg, { msgId: msg.dispatchId });
    await waitFor(() => sub.inFlight === 1, { timeoutMs: 5000 });
    await sub.stop();
    expect(finished).toBe(true);
    await waitFor(async () => (await bus.jsm.streams.info("MAIL_DELIVER")).state.messages === 0, {
      timeoutMs: 3000,
    });
  });

  it("never runs a message twice because it waited for a slot longer than the ack wait", async () => {
    const bus = await connect("mda");
    open.push(bus);
    const runs = new Map<string, number>();
    await bus.consume(
      "mda",
      LocalSchema,
      async (m) => {
        runs.set(m.queueId, (runs.get(m.queueId) ?? 0) + 1);
        await new Promise((r) => setTimeout(r, 1500)); // longer than the ack wait
      },
      { maxInFlight: 2, ackWaitMs: 1000 },
    );
    const sent: string[] = [];
    for (let i = 0; i < 6; i++) {
      const m = request();
      sent.push(m.queueId);
      await bus.publish(subjects.deliverLocal(), LocalSchema, m, { msgId: m.dispatchId });
    }
    await waitFor(async () => (await bus.jsm.streams.info("MAIL_DELIVER")).state.messages === 0, {
      timeoutMs: 20_000,
    });
    expect([...runs.keys()].sort()).toEqual([...sent].sort());
    expect([...runs.values()].every((n) => n === 1)).toBe(true);
  });

  it("exposes consumer lag as Prometheus gauges", async () => {
    const telemetry = quietTelemetry("mda");
    const bus = await Bus.connect({ url: nats.url, name: "lag", telemetry });
    await bus.ensureTopology();
    open.push(bus);
    let release!: () => void;
    const gate = new Promise<void>((r) => {
      release = r;
    });
    await bus.consume("mda", LocalSchema, () => gate, { maxInFlight: 1 });
    for (let i = 0; i < 5; i++) {
      const m = request();
      await bus.publish(subjects.deliverLocal(), LocalSchema, m, { msgId: m.dispatchId });
    }
    const text = await waitFor(
      async () => {
        const t = await telemetry.metrics.text();
        const pending = Number(
          /mailpipe_bus_consumer_pending\{consumer="mda"[^}]*\} (\d+)/.exec(t)?.[1] ?? -1,
        );
        const acking = Number(
          /mailpipe_bus_consumer_ack_pending\{consumer="mda"[^}]*\} (\d+)/.exec(t)?.[1] ?? -1,
        );
        return pending >= 1 && acking >= 1 && pending + acking === 5 ? t : false;
      },
      { timeoutMs: 5000 },
    );
    expect(text).toContain("# HELP mailpipe_bus_consumer_pending");
    release();
  });

  it("says clearly when NATS is not there", async () => {
    const err = await Bus.connect({
      url: "nats://127.0.0.1:1",
      name: "t",
      telemetry: quietTelemetry("router"),
    }).catch((e) => e);
    expect(err).toBeInstanceOf(BusConnectError);
    expect(err.message).toMatch(/cannot reach NATS at nats:\/\/127\.0\.0\.1:1 .*is nats-server running/);
    const withToken = await Bus.connect({
      url: "nats://s3cr3t@127.0.0.1:1",
      name: "t",
      telemetry: quietTelemetry("router"),
    }).catch((e) => e);
    expect(withToken.message).toContain("nats://[redacted]@127.0.0.1:1");
    expect(withToken.message).not.toContain("s3cr3t");
  });
});

describe("body store", () => {
  it("reads a body attached to its spool message by reference, checks it, and deletes it", async () => {
    const bus = await connect("router");
    open.push(bus);
    await bus.ensureTopology(["queued"]);
    const bodies = await bus.bodies();
    const body = Buffer.from("Subject: spooled\r\n\r\nhello\r\n");
    const queueId = newQueueId();
    const sha256 = createHash("sha256").update(body).digest("hex");
    const ack = await bus.publish(
      subjects.queued(),
      QueuedMail,
      {
        v: 1,
        queueId,
        source: "mx",
        receivedAt: new Date().toISOString(),
        envelope: {
          mailFrom: "",
          rcptTo: [{ address: "a@example.test" }],
          smtputf8: false,
          bodyType: "7BIT",
        },
        body: { attached: true, size: body.length, sha256 },
      },
      { msgId: queueId, attachment: body },
    );
    expect(ack.stream).toBe("MAIL_SPOOL");
    const ref = { stream: ack.stream, seq: ack.seq, size: body.length, sha256 };
    expect((await bodies.readBuffer(ref)).equals(body)).toBe(true);
    const streamed: Buffer[] = [];
    for await (const c of await bodies.read(ref)) streamed.push(c as Buffer);
    expect(Buffer.concat(streamed).equals(body)).toBe(true);
    // a request that carried the bytes is checked too, without a read
    expect((await bodies.readBuffer(ref, body)).equals(body)).toBe(true);
    await expect(bodies.readBuffer(ref, Buffer.from("forged"))).rejects.toBeInstanceOf(BodyIntegrityError);
    await expect(bodies.readBuffer({ ...ref, sha256: "0".repeat(64) })).rejects.toBeInstanceOf(
      BodyIntegrityError,
    );

    await bodies.deleteSpooled(ack.stream, ack.seq);
    await expect(bodies.readBuffer(ref)).rejects.toBeInstanceOf(BodyNotFoundError);
    await bodies.deleteSpooled(ack.stream, ack.seq); // deleting twice is fine
  });

  it("round-trips a 30 MB body byte-exact and streams it back", async () => {
    const bus = await connect("router");
    open.push(bus);
    const bodies = await bus.bodies();
    const body = randomBytes(30 * 1024 * 1024);
    async function* chunks() {
      for (let i = 0; i < body.length; i += 64 * 1024) yield body.subarray(i, i + 64 * 1024);
    }
    const key = newQueueId();
    const ref = await bodies.put(key, chunks());
    expect(ref).toEqual({
      bucket: "mail-bodies",
      key,
      size: body.length,
      sha256: createHash("sha256").update(body).digest("hex"),
    });
    const stream = await bodies.read(ref);
    const hash = createHash("sha256");
    let size = 0;
    let biggest = 0;
    for await (const chunk of stream) {
      hash.update(chunk as Buffer);
      size += (chunk as Buffer).length;
      biggest = Math.max(biggest, (chunk as Buffer).length);
    }
    expect(size).toBe(body.length);
    expect(hash.digest("hex")).toBe(ref.sha256);
    expect(biggest).toBeLessThan(2 * 1024 * 1024); // it came in chunks, not as one buffer

    await bodies.delete(key);
    expect(await bodies.exists(key)).toBe(false);
    await bodies.delete(key); // deleting twice is fine
  });

  it("checks the sha256 on read", async () => {
    const bus = await connect("router");
    open.push(bus);
    const bodies = await bus.bodies();
    const ref = await bodies.put(newQueueId(), Buffer.from("Subject: hi\r\n\r\nhello\r\n"));
    expect((await bodies.readBuffer(ref)).toString()).toBe("Subject: hi\r\n\r\nhello\r\n");
    const forged = { ...ref, sha256: createHash("sha256").update("something else").digest("hex") };
    await expect(bodies.readBuffer(forged)).rejects.toBeInstanceOf(BodyIntegrityError);
    await expect(bodies.readBuffer({ ...ref, size: ref.size + 1 })).rejects.toBeInstanceOf(
      BodyIntegrityError,
    );
  });

  it.each([
    ["empty", 0],
    ["one chunk", 2048],
    ["exactly one chunk", 128 * 1024],
    ["several chunks", 1024 * 1024],
  ])("reads a small body (%s) byte-exact, as a buffer and as a stream", async (_what, size) => {
    const bus = await connect("router");
    open.push(bus);
    const bodies = await bus.bodies();
    const body = randomBytes(size);
    const ref = await bodies.put(newQueueId(), body);
    expect((await bodies.readBuffer(ref)).equals(body)).toBe(true);
    const chunks: Buffer[] = [];
    for await (const c of await bodies.read(ref)) chunks.push(c as Buffer);
    expect(Buffer.concat(chunks).equals(body)).toBe(true);
  });

  it("says so when a body is missing or deleted", async () => {
    const bus = await connect("router");
    open.push(bus);
    const bodies = await bus.bodies();
    const missing = { bucket: "mail-bodies", key: newQueueId(), size: 1, sha256: "0".repeat(64) };
    await expect(bodies.readBuffer(missing)).rejects.toBeInstanceOf(BodyNotFoundError);
    const ref = await bodies.put(newQueueId(), Buffer.from("gone soon"));
    await bodies.delete(ref.key);
    await expect(bodies.readBuffer(ref)).rejects.toBeInstanceOf(BodyNotFoundError);
    await expect(bodies.read(ref)).rejects.toBeInstanceOf(BodyNotFoundError);
  });

  it("writes the Object Store's own layout: the library reads it, and a rewrite replaces a key", async () => {
    const bus = await connect("router");
    open.push(bus);
    const bodies = await bus.bodies();
    const body = randomBytes(300 * 1024); // three chunks
    const key = newQueueId();
    await bodies.put(key, body);
    const os = await new Objm(bus.js).open("mail-bodies");
    const got = await os.getBlob(key);
    expect(got && Buffer.from(got).equals(body)).toBe(true);
    expect((await os.info(key))?.size).toBe(body.length);
    // writing a key again (a retried DSN) replaces it, without mixing the old chunks in
    const again = await bodies.put(key, Buffer.from("again"));
    expect((await bodies.readBuffer(again)).toString()).toBe("again");
    expect(Buffer.from((await os.getBlob(key))!).toString()).toBe("again");
    await bodies.delete(key);
    expect((await os.info(key))?.deleted).toBe(true);
    const stream = await bus.jsm.streams.info("OBJ_mail-bodies", {
      subjects_filter: `$O.mail-bodies.C.${key}`,
    });
    expect(stream.state.subjects?.[`$O.mail-bodies.C.${key}`] ?? 0).toBe(0);
  });
});
