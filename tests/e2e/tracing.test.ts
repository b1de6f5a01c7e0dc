// Following one message across every service: one trace per message (spans exported over OTLP
// by every process), `mailctl track` timelines, and Prometheus counters that move.
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import {
  type ReceivedSpan,
  repoRoot,
  type SmtpPeer,
  sequence,
  startSmtpPeer,
  waitFor,
} from "@mailpipe/testing";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Pipeline, startPipeline } from "./harness.ts";

const exec = promisify(execFile);
let p: Pipeline;
let peer: SmtpPeer;

beforeAll(async () => {
  p = await startPipeline({
    services: ["mda", "router", "delivery", "mx", "msa"],
    tracing: true,
    dns: {
      "slow.test": { MX: [{ exchange: "mx.slow.test", priority: 10 }] },
      "mx.slow.test": { A: ["127.0.0.5"] },
    },
    env: { RETRY_SCHEDULE: "1s" },
  });
  peer = await startSmtpPeer({
    host: "127.0.0.5",
    port: p.ports.remoteSmtp,
    name: "mx.slow.test",
    script: { data: sequence({ reply: 451, text: "4.7.1 greylisted" }, "accept") },
  });
}, 120_000);

afterAll(async () => {
  await peer?.stop();
  await p?.stop();
});

const queueIdOf = (response: string) => /queued as ([0-9A-Z]{26})/.exec(response)?.[1];

/** The spans of the trace that carries `queueId`, once `ready` holds for them. */
async function traceOf(queueId: string, ready: (spans: ReceivedSpan[]) => boolean): Promise<ReceivedSpan[]> {
  let found: ReceivedSpan[] = [];
  await p.otlp!.waitForSpans((all) => {
    const traceIds = new Set(
      all.filter((s) => s.attributes["mail.queue_id"] === queueId).map((s) => s.traceId),
    );
    if (traceIds.size !== 1) return false;
    const [traceId] = traceIds;
    found = all.filter((s) => s.traceId === traceId);
    return ready(found);
  }, 30_000);
  return found;
}

/** Every span's parent is in the trace, and exactly one span is the root. */
function expectWellParented(spans: ReceivedSpan[]): void {
  const ids = new Set(spans.map((s) => s.spanId));
  const roots = spans.filter((s) => !s.parentSpanId);
  expect(roots.map((r) => `${r.service}:${r.name}`)).toHaveLength(1);
  for (const s of spans)
    if (s.parentSpanId)
      expect(ids.has(s.parentSpanId), `${s.service}:${s.name} has a parent in the trace`).toBe(true);
}

function parentOf(spans: ReceivedSpan[], s: ReceivedSpan): ReceivedSpan | undefined {
  return spans.find((x) => x.spanId === s.parentSpanId);
}

describe("one trace per message", () => {
  it("msa → router → two delivery attempts (defer, then accept) share one trace, correctly parented", async () => {
    const info = await nodemailer
      .createTransport({
        host: "127.0.0.1",
        port: p.ports.submission,
        requireTLS: true,
        tls: { rejectUnauthorized: false },
        auth: { user: "alice@example.test", pass: "alice-dev-password" },
      } as TransportOptions)
      .sendMail({
        envelope: { from: "alice@example.test", to: ["eve@slow.test"] },
        raw: "From: alice@example.test\r\nTo: eve@slow.test\r\nSubject: traced\r\n\r\nhello\r\n",
      });
    const queueId = queueIdOf(info.response)!;
    expect(queueId).toBeDefined();
    await peer.waitForMessages(1, 30_000);

    const spans = await traceOf(
      queueId,
      (s) => s.filter((x) => x.service === "delivery" && x.name === "smtp.deliver").length >= 2,
    );
    const services = new Set(spans.map((s) => s.service));
    expect([...services].sort()).toEqual(expect.arrayContaining(["delivery", "msa", "router"]));
    expectWellParented(spans);
    const root = spans.find((s) => !s.parentSpanId)!;
    expect(root).toMatchObject({ service: "msa", name: "smtp.transaction" });

    const attempts = spans
      .filter((s) => s.service === "delivery" && s.name === "smtp.deliver")
      .sort((a, b) => Number(a.startNs - b.startNs));
    expect(attempts).toHaveLength(2);
    expect(attempts.map((a) => a.attributes["smtp.reply.code"])).toEqual([451, 250]);
    // each attempt runs in delivery's consumer span, which continues a publish from the router
    for (const a of attempts) {
      const consumer = parentOf(spans, a)!;
      expect(consumer).toMatchObject({ service: "delivery", kind: 5 });
      const send = parentOf(spans, consumer)!;
      expect(send).toMatchObject({ service: "router", kind: 4 });
    }
    // no body, subject or password ever reaches a span
    const everything = JSON.stringify(spans.map((s) => s.attributes));
    expect(everything).not.toContain("traced");
    expect(everything).not.toContain("alice-dev-password");
  });

  it("mx → router → mda shares one trace too", async () => {
    const info = await nodemailer
      .createTransport({
        host: "127.0.0.1",
        port: p.ports.mx,
        tls: { rejectUnauthorized: false },
      } as TransportOptions)
      .sendMail({
        envelope: { from: "someone@elsewhere.test", to: ["bob@example.test"] },
        raw: "From: someone@elsewhere.test\r\nTo: bob@example.test\r\nSubject: inbound traced\r\n\r\nhi\r\n",
      });
    const queueId = queueIdOf(info.response)!;
    const spans = await traceOf(queueId, (s) =>
      s.some((x) => x.service === "mda" && x.name === "maildir.write"),
    );
    expect(new Set(spans.map((s) => s.service))).toEqual(new Set(["mx", "router", "mda"]));
    expectWellParented(spans);
    expect(spans.find((s) => !s.parentSpanId)).toMatchObject({ service: "mx", name: "smtp.transaction" });
    const write = spans.find((s) => s.name === "maildir.write")!;
    expect(write.attributes["mail.recipient.domain"]).toBe("example.test");
  });
});

describe("mailctl track", () => {
  it("prints every step of a message in order, with its trace id", async () => {
    let attempts = 0;
    peer.setScript({ data: () => (attempts++ === 0 ? { reply: 451, text: "4.7.1 greylisted" } : "accept") });
    const info = await nodemailer
      .createTransport({
        host: "127.0.0.1",
        port: p.ports.submission,
        requireTLS: true,
        tls: { rejectUnauthorized: false },
        auth: { user: "alice@example.test", pass: "alice-dev-password" },
      } as TransportOptions)
      .sendMail({
        envelope: { from: "alice@example.test", to: ["eve@slow.test"] },
        raw: "From: alice@example.test\r\nTo: eve@slow.test\r\nSubject: tracked\r\nMessage-ID: <tracked-1@example.test>\r\n\r\nhello\r\n",
      });
    const queueId = queueIdOf(info.response)!;
    const track = () =>
      exec("node", [join(repoRoot, "packages/mailctl/src/main.ts"), "track", queueId], {
        env: { ...process.env, NATS_URL: p.nats.url },
      });
    const out = await waitFor(
      async () => {
        const { stdout } = await track().catch(() => ({ stdout: "" }));
        return / delivered /.test(stdout) ? stdout : false;
      },
      { timeoutMs: 30_000, message: "the message never showed as delivered in mailctl track" },
    );

    expect(out).toContain(
      `message ${queueId}  Message-ID <tracked-1@example.test>  from <alice@example.test>`,
    );
    const steps = out
      .split("\n")
      .filter((l) => /^ {2}\d{4}-/.test(l))
      .map((l) => l.trim().split(/\s+/).slice(2, 4) as [string, string]);
    const order = steps.map(([service, type]) => `${service} ${type}`);
    const expectInOrder = (...wanted: string[]) => {
      let at = -1;
      for (const w of wanted) {
        const i = order.findIndex((x, j) => j > at && x === w);
        expect(i, `${w} after position ${at} in\n${order.join("\n")}`).toBeGreaterThan(at);
        at = i;
      }
    };
    expectInOrder(
      "msa received",
      "msa queued",
      "router routed",
      "delivery attempt",
      "delivery deferred",
      "delivery attempt",
      "delivery delivered",
    );
    expect(out).toMatch(/deferred\s+eve@slow\.test.*"451 4\.7\.1 greylisted"/);
    const traceLine = /trace ([0-9a-f]{32})/.exec(out);
    expect(traceLine).not.toBeNull();
    const spans = await traceOf(queueId, (s) => s.some((x) => x.name === "smtp.deliver"));
    expect(traceLine![1]).toBe(spans[0]!.traceId);
  });
});

describe("metrics", () => {
  const scrape = async (name: string) => (await fetch(p.services.get(name)!.url("/metrics"))).text();
  const value = (text: string, metric: string, labels: Record<string, string> = {}) => {
    let sum = 0;
    for (const line of text.split("\n")) {
      if (!line.startsWith(`${metric}{`) && !line.startsWith(`${metric} `)) continue;
      if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`)))
        sum += Number(line.split(" ").at(-1));
    }
    return sum;
  };

  it("every service's /metrics exposes its counters, and they move when mail flows", async () => {
    const before = {
      mx: value(await scrape("mx"), "mailpipe_smtp_messages_total", { result: "accepted" }),
      mda: value(await scrape("mda"), "mailpipe_mda_deliveries_total", { outcome: "delivered" }),
      router: value(await scrape("router"), "mailpipe_router_routed_total"),
    };
    await nodemailer
      .createTransport({
        host: "127.0.0.1",
        port: p.ports.mx,
        tls: { rejectUnauthorized: false },
      } as TransportOptions)
      .sendMail({
        envelope: { from: "x@elsewhere.test", to: ["alice@example.test"] },
        raw: "Subject: counted\r\n\r\nx\r\n",
      });
    // and one through msa to the remote peer, deferred once then accepted
    let tries = 0;
    peer.setScript({ data: () => (tries++ === 0 ? { reply: 451, text: "4.7.1 later" } : "accept") });
    await nodemailer
      .createTransport({
        host: "127.0.0.1",
        port: p.ports.submission,
        requireTLS: true,
        tls: { rejectUnauthorized: false },
        auth: { user: "alice@example.test", pass: "alice-dev-password" },
      } as TransportOptions)
      .sendMail({
        envelope: { from: "alice@example.test", to: ["eve@slow.test"] },
        raw: "From: alice@example.test\r\nSubject: counted out\r\n\r\nx\r\n",
      });
    await waitFor(() => peer.messages.some((m) => m.raw.includes("Subject: counted out")), {
      timeoutMs: 30_000,
    });
    await waitFor(
      async () =>
        value(await scrape("mda"), "mailpipe_mda_deliveries_total", { outcome: "delivered" }) > before.mda,
      {
        timeoutMs: 20_000,
      },
    );
    const mx = await scrape("mx");
    expect(value(mx, "mailpipe_smtp_messages_total", { result: "accepted" })).toBeGreaterThan(before.mx);
    expect(value(mx, "mailpipe_smtp_sessions_total")).toBeGreaterThan(0);
    expect(value(mx, "mailpipe_smtp_replies_total", { code: "250" })).toBeGreaterThan(0);
    const router = await scrape("router");
    expect(value(router, "mailpipe_router_routed_total")).toBeGreaterThan(before.router);
    expect(router).toContain("mailpipe_queue_scheduled");
    expect(router).toContain("mailpipe_queue_oldest_age_seconds");
    expect(router).toMatch(/mailpipe_message_final_seconds_count\{[^}]*\} [1-9]/);
    expect(router).toMatch(/mailpipe_bus_consumer_pending\{consumer="router"/);
    const delivery = await scrape("delivery");
    expect(
      value(delivery, "mailpipe_delivery_outcomes_total", { outcome: "delivered", destination: "slow.test" }),
    ).toBeGreaterThan(0);
    expect(
      value(delivery, "mailpipe_delivery_outcomes_total", { outcome: "deferred", destination: "slow.test" }),
    ).toBeGreaterThan(0);
    const msa = await scrape("msa");
    expect(value(msa, "mailpipe_msa_auth_total", { result: "success" })).toBeGreaterThan(0);
    expect(value(msa, "mailpipe_smtp_messages_total", { result: "accepted" })).toBeGreaterThan(0);
  });
});
