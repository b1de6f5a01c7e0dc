import { parseConfig } from "@mailpipe/service-kit";
import { type NatsHandle, startNats, waitFor } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { type EdgeHarness, type HarnessOptions, openData, startEdge } from "../test/harness.ts";
import type { RawSmtp } from "../test/raw-smtp.ts";
import { edgeConfig, edgeLimits } from "./config.ts";
import { MemoryBudget } from "./memory-budget.ts";
import { createSmtpEdge } from "./server.ts";

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

async function client(h: EdgeHarness): Promise<RawSmtp> {
  const c = await h.connect();
  clients.push(c);
  return c;
}

async function metric(h: EdgeHarness, pattern: RegExp): Promise<number> {
  const m = pattern.exec(await h.telemetry.metrics.text());
  return m ? Number(m[1]) : Number.NaN;
}
const inUse = (h: EdgeHarness) => metric(h, /^mailpipe_smtp_memory_budget_bytes\{service="mx"\} (\d+)$/m);

const KiB = 1024;
const body = (bytes: number) => `${"x".repeat(98)}\r\n`.repeat(Math.ceil(bytes / 100));

describe("edge-wide memory budget", () => {
  it("refuses what does not fit with 452 4.3.1, at MAIL for a declared SIZE and at the end of DATA otherwise", async () => {
    const h = await edge({ maxMessageSize: 64 * KiB, memoryBudget: 100 * KiB });
    // one transaction holds 60 KiB, mid-DATA
    const holder = await client(h);
    await openData(holder);
    holder.write(`Subject: holder\r\n\r\n${body(60 * KiB)}`);
    await waitFor(async () => (await inUse(h)) >= 60 * KiB, { timeoutMs: 5000, message: "60 KiB held" });

    const other = await client(h);
    await other.command("EHLO client.test");
    expect(await other.command("MAIL FROM:<b@remote.test> SIZE=50000")).toMatchObject({
      code: 452,
      enhanced: "4.3.1",
    });
    // a SIZE that fits is fine
    expect((await other.command("MAIL FROM:<b@remote.test> SIZE=20000")).code).toBe(250);
    expect((await other.command("RSET")).code).toBe(250);

    // undeclared, it is read to the end without being kept, then refused
    expect((await other.command("MAIL FROM:<b@remote.test>")).code).toBe(250);
    expect((await other.command("RCPT TO:<alice@example.test>")).code).toBe(250);
    expect((await other.command("DATA")).code).toBe(354);
    other.write(`Subject: too much now\r\n\r\n${body(50 * KiB)}.\r\n`);
    expect(await other.read()).toMatchObject({ code: 452, enhanced: "4.3.1" });
    expect(h.seen.map((s) => s.tx.mailFrom)).toEqual([]);
    // what it had taken before running out was given back; the holder's bytes are still counted
    const held = await inUse(h);
    expect(held).toBeGreaterThanOrEqual(60 * KiB);
    expect(held).toBeLessThan(64 * KiB);

    holder.write(".\r\n");
    expect(await holder.read()).toMatchObject({ code: 250, enhanced: "2.0.0" });
    expect(await inUse(h)).toBe(0);

    // the same message fits now
    expect((await other.command("MAIL FROM:<b@remote.test> SIZE=50000")).code).toBe(250);
    expect((await other.command("RCPT TO:<alice@example.test>")).code).toBe(250);
    expect((await other.command("DATA")).code).toBe(354);
    other.write(`Subject: fits now\r\n\r\n${body(50 * KiB)}.\r\n`);
    expect(await other.read()).toMatchObject({ code: 250, enhanced: "2.0.0" });
    await waitFor(() => h.queued.length === 2, { timeoutMs: 5000 });
    expect(await inUse(h)).toBe(0);

    const text = await h.telemetry.metrics.text();
    expect(text).toMatch(/^mailpipe_smtp_memory_budget_refusals_total\{stage="mail",service="mx"\} 1$/m);
    expect(text).toMatch(/^mailpipe_smtp_memory_budget_refusals_total\{stage="data",service="mx"\} 1$/m);
  });

  it("gives the bytes back when the client disconnects mid-DATA or the message is refused", async () => {
    const h = await edge({
      maxMessageSize: 64 * KiB,
      memoryBudget: 100 * KiB,
      hooks: {
        message: (_tx, m) => {
          if (m.header("subject")[0] === "refuse me") throw new Error("policy failed");
        },
      },
    });
    const gone = await client(h);
    await openData(gone);
    gone.write(`Subject: gone\r\n\r\n${body(40 * KiB)}`);
    await waitFor(async () => (await inUse(h)) >= 40 * KiB, { timeoutMs: 5000 });
    gone.close();
    await waitFor(async () => (await inUse(h)) === 0, { timeoutMs: 5000, message: "released on close" });

    const refused = await client(h);
    await openData(refused);
    refused.write(`Subject: refuse me\r\n\r\n${body(40 * KiB)}.\r\n`);
    expect(await refused.read()).toMatchObject({ code: 451, enhanced: "4.3.0" });
    expect(await inUse(h)).toBe(0);
  });

  it("listeners given one budget share it, and it cannot be smaller than a message", async () => {
    const c = parseConfig(z.object(edgeConfig), {});
    expect(c.SMTP_MEMORY_BUDGET).toBe(512 * 1024 * 1024);
    const limits = edgeLimits(c);
    expect(limits.memoryBudget).toBeInstanceOf(MemoryBudget);
    expect((limits.memoryBudget as MemoryBudget).limit).toBe(512 * 1024 * 1024);

    const shared = new MemoryBudget(100 * KiB);
    const a = await edge({ maxMessageSize: 64 * KiB, memoryBudget: shared });
    const b = await edge({ maxMessageSize: 64 * KiB, memoryBudget: shared });
    const onA = await client(a);
    await openData(onA);
    onA.write(`Subject: a\r\n\r\n${body(60 * KiB)}`);
    await waitFor(() => shared.used >= 60 * KiB, { timeoutMs: 5000 });
    const onB = await client(b);
    await onB.command("EHLO client.test");
    expect(await onB.command("MAIL FROM:<b@remote.test> SIZE=50000")).toMatchObject({
      code: 452,
      enhanced: "4.3.1",
    });

    await expect(
      createSmtpEdge({
        service: "mx",
        hostname: "mx.test",
        telemetry: a.telemetry,
        bus: a.bus,
        hooks: { message: () => {} },
        port: 0,
        maxMessageSize: 64 * KiB,
        memoryBudget: 32 * KiB,
        maxRecipients: 10,
        maxConnections: 10,
        maxConnectionsPerIp: 10,
        idleTimeoutMs: 10_000,
        dataTimeoutMs: 10_000,
        sessionTimeoutMs: 10_000,
      }),
    ).rejects.toThrow(/SMTP_MEMORY_BUDGET .* is below MAX_MESSAGE_SIZE/);
  });
});
