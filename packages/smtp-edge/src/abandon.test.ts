// A client told an attempt failed (451 at the accept timeout, 421 at the shutdown deadline) sends
// the message again: the attempt it was told about must never reach the spool as well. The step that
// can be slow before the spool publish is the Object Store write of a body over ATTACH_MAX (a smaller
// body goes out with the publish itself, and a publish on its way cannot be called back), so these
// messages are large.
import type { BodyStore } from "@mailpipe/bus";
import { newQueueId } from "@mailpipe/contracts";
import { type NatsHandle, startNats, waitFor } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type EdgeHarness, type HarnessOptions, openData, startEdge } from "../test/harness.ts";
import type { RawSmtp } from "../test/raw-smtp.ts";
import { ATTACH_MAX, acceptMessage } from "./accept.ts";

let nats: NatsHandle;
const open: EdgeHarness[] = [];
const clients: RawSmtp[] = [];
const gates: (() => void)[] = [];

beforeAll(async () => {
  nats = await startNats();
});
afterEach(async () => {
  for (const open of gates.splice(0)) open();
  for (const c of clients.splice(0)) c.close();
  await Promise.all(open.splice(0).map((h) => h.close()));
});
afterAll(async () => {
  await nats?.stop();
});

async function edge(opts: HarnessOptions): Promise<EdgeHarness> {
  const h = await startEdge(nats.url, opts);
  open.push(h);
  return h;
}

async function client(h: EdgeHarness): Promise<RawSmtp> {
  const c = await h.connect();
  clients.push(c);
  return c;
}

/**
 * Holds every body store write until `release()`: the edge's store-and-publish stays in progress
 * for as long as the test wants. Records what was written and deleted.
 */
async function holdStores(h: EdgeHarness) {
  const store: BodyStore = await h.bus.bodies();
  const put = store.put.bind(store);
  const del = store.delete.bind(store);
  let release!: () => void;
  const gate = new Promise<void>((r) => {
    release = r;
  });
  gates.push(release);
  const held = { store, started: [] as string[], deleted: [] as string[], release };
  store.put = async (key, source) => {
    held.started.push(key);
    await gate;
    return put(key, source);
  };
  store.delete = async (key) => {
    await del(key);
    held.deleted.push(key);
  };
  return held;
}

/** Publishes one more message the way the edge does and waits for it: what was published before is in by then. */
async function drainQueued(h: EdgeHarness): Promise<void> {
  const queueId = newQueueId();
  await acceptMessage({
    bus: h.bus,
    telemetry: h.telemetry,
    queueId,
    source: "mx",
    envelope: { mailFrom: "", rcptTo: [{ address: "a@example.test" }], smtputf8: false, bodyType: "7BIT" },
    prepend: "",
    chunks: [Buffer.from("Subject: sentinel\r\n\r\nx\r\n")],
  });
  await waitFor(() => h.queued.some((m) => m.queueId === queueId), { timeoutMs: 5000 });
}

/** A message whose body is stored in the Object Store before it is spooled. */
function large(subject: string): string {
  const line = `${"x".repeat(76)}\r\n`;
  return `Subject: ${subject}\r\n\r\n${line.repeat(Math.ceil(ATTACH_MAX / line.length) + 100)}.\r\n`;
}

describe("accept timeout", () => {
  it("answers 451 4.3.0 and never queues the message, even when storing completes later", async () => {
    const h = await edge({ acceptTimeoutMs: 500 });
    const held = await holdStores(h);
    const c = await client(h);
    await openData(c);
    c.write(large("slow store"));
    expect(await c.read(5000)).toMatchObject({ code: 451, enhanced: "4.3.0" });
    expect(held.started).toHaveLength(1);
    const queueId = held.started[0]!;

    held.release();
    // the store finishes after the client was told; the edge throws the body away instead of queueing
    await waitFor(() => held.deleted.includes(queueId), { timeoutMs: 5000, message: "body deleted" });
    expect(await held.store.exists(queueId)).toBe(false);
    await drainQueued(h);
    expect(h.queued.map((m) => m.queueId)).not.toContain(queueId);

    // the client's retry is the one copy
    await c.command("MAIL FROM:<sender@remote.test>");
    await c.command("RCPT TO:<alice@example.test>");
    await c.command("DATA");
    c.write(large("slow store"));
    expect(await c.read(5000)).toMatchObject({ code: 250, enhanced: "2.0.0" });
    await waitFor(() => h.queued.filter((m) => m.envelope.mailFrom === "sender@remote.test").length === 1, {
      timeoutMs: 5000,
    });
  });
});

describe("shutdown", () => {
  it("lets a message being stored finish with 250 while cutting off a client still sending", async () => {
    const h = await edge({ acceptTimeoutMs: 10_000 });
    const held = await holdStores(h);
    const storing = await client(h);
    await openData(storing);
    storing.write(large("being stored"));
    await waitFor(() => held.started.length === 1, { timeoutMs: 5000 });
    const sending = await client(h);
    await openData(sending, "slow@remote.test");
    sending.write("Subject: still sending\r\n\r\n");

    // 4 s, of which the last 2 s are kept for messages being stored
    const closed = h.edge.close({ timeoutMs: 4000 });
    expect(await sending.read(4000)).toMatchObject({ code: 421, enhanced: "4.3.2" });
    // the cutoff has passed; the message being stored is still answered
    held.release();
    expect(await storing.read(4000)).toMatchObject({ code: 250, enhanced: "2.0.0" });
    expect(await storing.read(4000)).toMatchObject({ code: 421, enhanced: "4.3.2" });
    await closed;
    await waitFor(() => h.queued.some((m) => m.queueId === held.started[0]), { timeoutMs: 5000 });
    expect(h.queued.map((m) => m.envelope.mailFrom)).not.toContain("slow@remote.test");
  });

  it("answers 421 4.3.2 to a message still being stored at the deadline, and never queues it", async () => {
    const h = await edge({ acceptTimeoutMs: 10_000 });
    const held = await holdStores(h);
    const c = await client(h);
    await openData(c);
    c.write(large("stuck in store"));
    await waitFor(() => held.started.length === 1, { timeoutMs: 5000 });
    const queueId = held.started[0]!;

    await h.edge.close({ timeoutMs: 1000 });
    expect(await c.read(3000)).toMatchObject({ code: 421, enhanced: "4.3.2" });

    held.release();
    await waitFor(() => held.deleted.includes(queueId), { timeoutMs: 5000, message: "body deleted" });
    await drainQueued(h);
    expect(h.queued.map((m) => m.queueId)).not.toContain(queueId);
  });
});
