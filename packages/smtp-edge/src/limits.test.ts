import { type NatsHandle, startNats, waitFor } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type EdgeHarness, type HarnessOptions, openData, startEdge } from "../test/harness.ts";
import { RawSmtp } from "../test/raw-smtp.ts";

let nats: NatsHandle;
const open: EdgeHarness[] = [];
const clients: RawSmtp[] = [];

beforeAll(async () => {
  nats = await startNats();
});
afterEach(async () => {
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

async function client(h: EdgeHarness, localAddress?: string): Promise<RawSmtp> {
  const c = await h.connect(localAddress ? { localAddress } : {});
  clients.push(c);
  return c;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("size limit", () => {
  it("advertises SIZE, refuses a declared or actual oversize with 552 5.3.4 and keeps the session usable", async () => {
    const h = await edge({ maxMessageSize: 2000 });
    const c = await client(h);
    const ehlo = await c.command("EHLO client.test");
    expect(ehlo.lines.map((l) => l.slice(4))).toContain("SIZE 2000");
    expect(await c.command("MAIL FROM:<a@remote.test> SIZE=5000")).toMatchObject({
      code: 552,
      enhanced: "5.3.4",
    });

    expect((await c.command("MAIL FROM:<a@remote.test>")).code).toBe(250);
    expect((await c.command("RCPT TO:<alice@example.test>")).code).toBe(250);
    expect((await c.command("DATA")).code).toBe(354);
    c.write(`Subject: big\r\n\r\n${"0123456789abcdef\r\n".repeat(200)}.\r\n`);
    expect(await c.read()).toMatchObject({ code: 552, enhanced: "5.3.4" });

    await c.command("MAIL FROM:<a@remote.test>");
    await c.command("RCPT TO:<alice@example.test>");
    await c.command("DATA");
    c.write("Subject: small\r\n\r\nok\r\n.\r\n");
    const ok = await c.read();
    expect(ok).toMatchObject({ code: 250, enhanced: "2.0.0" });
    await waitFor(() => h.queued.length === 1, { timeoutMs: 5000 });
    expect(ok.text).toContain(h.queued[0]!.queueId);
  });
});

describe("header block limit", () => {
  it("refuses a message whose header block is over 1 MiB with 552 5.3.4 and keeps the session usable", async () => {
    const h = await edge({ maxMessageSize: 8 * 1024 * 1024 });
    const c = await client(h);
    await openData(c);
    // 6 MiB of header lines and no body: under the size limit, far over any real header block
    const line = `X-Filler: ${"h".repeat(88)}\r\n`;
    const block = line.repeat(4096); // 400 KiB
    for (let i = 0; i < 16; i++) c.write(block);
    c.write(".\r\n");
    expect(await c.read(20_000)).toMatchObject({ code: 552, enhanced: "5.3.4" });
    expect(h.seen).toHaveLength(0);

    await c.command("MAIL FROM:<a@remote.test>");
    await c.command("RCPT TO:<alice@example.test>");
    await c.command("DATA");
    c.write(`${line.repeat(100)}Subject: fine\r\n\r\nbody\r\n.\r\n`);
    expect(await c.read()).toMatchObject({ code: 250, enhanced: "2.0.0" });
    await waitFor(() => h.queued.length === 1, { timeoutMs: 5000 });
  });
});

describe("recipients and loops", () => {
  it("answers the recipient over the limit with 452 4.5.3", async () => {
    const h = await edge({ maxRecipients: 2 });
    const c = await client(h);
    await c.command("EHLO client.test");
    await c.command("MAIL FROM:<a@remote.test>");
    expect((await c.command("RCPT TO:<r1@example.test>")).code).toBe(250);
    expect((await c.command("RCPT TO:<r2@example.test>")).code).toBe(250);
    expect(await c.command("RCPT TO:<r3@example.test>")).toMatchObject({ code: 452, enhanced: "4.5.3" });
  });

  it("refuses a message with more Received fields than allowed with 554 5.4.6", async () => {
    const h = await edge({ maxReceivedHeaders: 3 });
    const c = await client(h);
    await openData(c);
    c.write(`${"Received: from a by b; x\r\n".repeat(4)}Subject: loop\r\n\r\nx\r\n.\r\n`);
    expect(await c.read()).toMatchObject({ code: 554, enhanced: "5.4.6" });
    expect(h.seen).toHaveLength(0);
  });
});

describe("connection limits", () => {
  it("refuses the connection over the per-IP limit with 421 4.7.0, others IPs still get in", async () => {
    const h = await edge({ maxConnectionsPerIp: 2 });
    const a = await client(h);
    const b = await client(h);
    expect([a.greeting.code, b.greeting.code]).toEqual([220, 220]);
    expect(a.greeting.lines[0]).toMatch(/^220 mx\.test ESMTP/);
    const c = await client(h);
    expect(c.greeting).toMatchObject({ code: 421, enhanced: "4.7.0" });
    await c.waitClosed(3000);
    const other = await client(h, "127.0.0.2");
    expect(other.greeting.code).toBe(220);
    a.close();
    await waitFor(() => h.edge.connections <= 2, { timeoutMs: 3000 });
    expect((await client(h)).greeting.code).toBe(220);
  });

  it("refuses connections over the overall limit with 421 4.7.0", async () => {
    const h = await edge({ maxConnections: 2, maxConnectionsPerIp: 10 });
    await client(h);
    await client(h, "127.0.0.2");
    const third = await client(h, "127.0.0.3");
    expect(third.greeting).toMatchObject({ code: 421, enhanced: "4.7.0" });
  });
});

describe("time limits", () => {
  it("cuts off a client trickling DATA one byte at a time with 421 4.4.2", async () => {
    const h = await edge({ dataTimeoutMs: 1200, idleTimeoutMs: 5000 });
    const c = await client(h);
    await openData(c);
    const started = Date.now();
    const line = "Subject: slow\r\n\r\n";
    // bounded: at most 40 bytes, one every 150 ms, well past the limit
    for (let i = 0; i < 40 && !c.closed; i++) {
      c.write(line[i % line.length]!);
      await sleep(150);
    }
    const r = await c.read(1000);
    expect(r).toMatchObject({ code: 421, enhanced: "4.4.2" });
    expect(Date.now() - started).toBeLessThan(40 * 150);
    await c.waitClosed(3000);
    expect(h.seen).toHaveLength(0);
    await sleep(300);
    expect(h.queued).toHaveLength(0);
  });

  it("ends a session that outlives the session limit though it keeps sending, with 421 4.4.2", async () => {
    const h = await edge({ sessionTimeoutMs: 1000, idleTimeoutMs: 5000 });
    const c = await client(h);
    for (let i = 0; i < 30 && !c.closed; i++) {
      c.write("N"); // never completes a command, never idle either
      await sleep(100);
    }
    expect(await c.read(500)).toMatchObject({ code: 421, enhanced: "4.4.2" });
    await c.waitClosed(3000);
  });

  it("closes an idle client with 421 4.4.2", async () => {
    const h = await edge({ idleTimeoutMs: 500 });
    const c = await client(h);
    await c.command("EHLO client.test");
    expect(await c.read(3000)).toMatchObject({ code: 421, enhanced: "4.4.2" });
    await c.waitClosed(3000);
  });
});

describe("graceful shutdown", () => {
  it("closes idle sessions with 421 4.3.2, lets a transaction in progress finish, refuses new ones", async () => {
    const h = await edge({});
    const idle = await client(h);
    await idle.command("EHLO client.test");
    const busy = await client(h);
    await openData(busy);

    const closed = h.edge.close({ timeoutMs: 5000 });
    expect(await idle.read(2000)).toMatchObject({ code: 421, enhanced: "4.3.2" });
    await idle.waitClosed(3000);
    await expect(RawSmtp.connect({ port: h.edge.port })).rejects.toThrow(/ECONNREFUSED/);

    busy.write("Subject: last one\r\n\r\nbody\r\n.\r\n");
    expect(await busy.read()).toMatchObject({ code: 250, enhanced: "2.0.0" });
    expect(await busy.read(2000)).toMatchObject({ code: 421, enhanced: "4.3.2" });
    await closed;
    await waitFor(() => h.queued.length === 1, { timeoutMs: 5000 });
  });

  it("gives up on a transaction still being sent at the cutoff with 421 4.3.2", async () => {
    const h = await edge({});
    const stuck = await client(h);
    await openData(stuck);
    stuck.write("Subject: never ends\r\n\r\n");
    const started = Date.now();
    // the last half (at most acceptTimeoutMs) is kept for messages already received
    await h.edge.close({ timeoutMs: 800 });
    expect(Date.now() - started).toBeGreaterThanOrEqual(350);
    expect(await stuck.read(1000)).toMatchObject({ code: 421, enhanced: "4.3.2" });
    expect(h.seen).toHaveLength(0);
  });
});
