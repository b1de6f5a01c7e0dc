import { Writable } from "node:stream";
import { Bus, type Subscription } from "@mailpipe/bus";
import { type QueuedMail, QueuedMail as QueuedMailSchema, topology } from "@mailpipe/contracts";
import { RawSmtp } from "@mailpipe/smtp-edge/testing";
import { createTelemetry } from "@mailpipe/telemetry";
import { freePort, type ServiceHandle, startService, waitFor } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type MxEnvironment, queueIdOf, startEnvironment } from "../test/harness.ts";

let e: MxEnvironment;
let bus: Bus;
let sub: Subscription;
const queued: QueuedMail[] = [];
const running: ServiceHandle[] = [];

beforeAll(async () => {
  e = await startEnvironment();
  const telemetry = createTelemetry({
    service: "router",
    defaultMetrics: false,
    logDestination: new Writable({ write: (_c, _e, cb) => cb() }),
  });
  bus = await Bus.connect({ url: e.nats.url, name: "mx-process-test", telemetry });
  await bus.ensureTopology();
  await bus.jsm.streams.purge(topology.streams.queued.name);
  sub = await bus.consume("router", QueuedMailSchema, (m) => {
    queued.push(m);
  });
});
afterEach(async () => {
  await Promise.all(running.splice(0).map((s) => s.kill()));
});
afterAll(async () => {
  await sub?.stop();
  await bus?.close();
  await e?.stop();
});

async function startMxProcess(): Promise<{ svc: ServiceHandle; port: number }> {
  const port = await freePort();
  const svc = await startService("mx", { env: e.env({ MX_PORT: String(port), LOG_LEVEL: "info" }) });
  running.push(svc);
  return { svc, port };
}

async function readyz(
  svc: ServiceHandle,
): Promise<{ status: number; body: { checks: Record<string, boolean> } }> {
  const res = await fetch(svc.url("/readyz"), { signal: AbortSignal.timeout(2000) });
  return { status: res.status, body: (await res.json()) as { checks: Record<string, boolean> } };
}

async function transaction(c: RawSmtp, subject: string): Promise<void> {
  expect((await c.command("MAIL FROM:<x@sender.test>")).code).toBe(250);
  expect((await c.command("RCPT TO:<alice@example.test>")).code).toBe(250);
  expect((await c.command("DATA")).code).toBe(354);
  c.write(`From: x@sender.test\r\nSubject: ${subject}\r\n\r\nbody\r\n`);
}

describe("mx as a process", () => {
  it("answers /readyz 200, queues mail, exports metrics and exits 0 on SIGTERM", async () => {
    const { svc, port } = await startMxProcess();
    expect(await readyz(svc)).toMatchObject({ status: 200, body: { checks: { nats: true, smtp: true } } });

    const c = await RawSmtp.connect({ port });
    expect(c.greeting.lines[0]).toMatch(/^220 mx\.test ESMTP/);
    await c.command("EHLO client.test");
    await transaction(c, "via the process");
    c.write(".\r\n");
    const r = await c.read();
    expect(r).toMatchObject({ code: 250, enhanced: "2.0.0" });
    await c.command("QUIT");
    c.close();
    const queueId = queueIdOf(r.text);
    await waitFor(() => queued.some((q) => q.queueId === queueId), { timeoutMs: 5000 });

    const metrics = await (await fetch(svc.url("/metrics"))).text();
    expect(metrics).toMatch(/mailpipe_smtp_replies_total\{code="250",service="mx"\} \d+/);
    expect(metrics).toMatch(/mailpipe_mx_auth_results_total\{check="spf",result="pass",service="mx"\} 1/);

    expect(await svc.stop("SIGTERM")).toBe(0);
    expect(svc.logs.some((l) => l.includes("mx stopped"))).toBe(true);
    // the log lines of the transaction carry its queue ID
    expect(svc.logs.some((l) => l.includes('"msg":"message accepted"') && l.includes(queueId))).toBe(true);
  });

  it("answers 451 4.3.0 (not 250) when NATS stops during DATA, turns unready, and recovers", async () => {
    const { svc, port } = await startMxProcess();
    const c = await RawSmtp.connect({ port });
    await c.command("EHLO client.test");
    await transaction(c, "during the outage");

    await e.nats.kill();
    c.write(".\r\n");
    expect(await c.read(20_000)).toMatchObject({ code: 451, enhanced: "4.3.0" });
    await waitFor(async () => (await readyz(svc)).status === 503, { timeoutMs: 10_000, message: "unready" });
    expect((await readyz(svc)).body.checks.nats).toBe(false);

    await e.nats.restart();
    await waitFor(async () => (await readyz(svc)).status === 200, {
      timeoutMs: 15_000,
      message: "ready again",
    });
    await transaction(c, "after the outage");
    c.write(".\r\n");
    const r = await c.read(20_000);
    expect(r).toMatchObject({ code: 250, enhanced: "2.0.0" });
    c.close();
    await waitFor(() => queued.some((q) => q.queueId === queueIdOf(r.text)), { timeoutMs: 15_000 });
    expect(await svc.stop("SIGTERM")).toBe(0);
  });
});
