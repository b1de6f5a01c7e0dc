// Cluster-wide destination limits end to end: a real router and three real delivery processes share
// one limit per destination site through Redis. The remote MX hosts are SMTP peers on 127.0.0.x that
// count the transactions they serve at once.
import { createHash } from "node:crypto";
import { Bus } from "@mailpipe/bus";
import { newQueueId, QueuedMail, subjects } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import {
  freePort,
  type PeerScript,
  type ServiceHandle,
  type SmtpPeer,
  startSmtpPeer,
  waitFor,
} from "@mailpipe/testing";
import { afterEach, describe, expect, it } from "vitest";
import { type Pipeline, startPipeline } from "./harness.ts";

const dns = {
  // two domains served by the same host: one site, one limit
  "slow-a.test": { MX: [{ exchange: "mx.slow.test", priority: 10 }] },
  "slow-b.test": { MX: [{ exchange: "mx.slow.test", priority: 10 }] },
  "mx.slow.test": { A: ["127.0.0.2"] },
  "fast.test": { MX: [{ exchange: "mx.fast.test", priority: 10 }] },
  "mx.fast.test": { A: ["127.0.0.3"] },
  "rate.test": { MX: [{ exchange: "mx.rate.test", priority: 10 }] },
  "mx.rate.test": { A: ["127.0.0.4"] },
};
const HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

let p: Pipeline | undefined;
let bus: Bus | undefined;
const peers: SmtpPeer[] = [];

afterEach(async () => {
  await Promise.all(peers.splice(0).map((x) => x.stop()));
  await bus?.close();
  bus = undefined;
  await p?.stop();
  p = undefined;
});

/** Peers on 127.0.0.2…4, one port (SMTP_REMOTE_PORT is one number for every MX). */
async function startPeers(scripts: Record<string, PeerScript>): Promise<number> {
  for (let round = 0; round < 5; round++) {
    const port = await freePort(HOSTS[0]);
    try {
      for (const host of HOSTS) peers.push(await startSmtpPeer({ host, port, script: scripts[host] ?? {} }));
      return port;
    } catch {
      await Promise.all(peers.splice(0).map((x) => x.stop()));
    }
  }
  throw new Error("no port free on every peer address");
}
const peer = (host: string) => peers.find((x) => x.host === host)!;

/** A router and three delivery workers, each with its own connections. */
async function pipeline(routerEnv: Record<string, string>, deliveryEnv: Record<string, string> = {}) {
  const port = await startPeers({});
  p = await startPipeline({
    services: [],
    dns,
    serviceEnv: { router: { SCHEDULER_INTERVAL: "200ms", ...routerEnv } },
  });
  const router = await p.start("router");
  const workers: ServiceHandle[] = [];
  for (const n of [1, 2, 3]) {
    workers.push(
      await p.start("delivery", `delivery-${n}`, {
        MAIL_HOSTNAME: `w${n}.sender.test`,
        SMTP_REMOTE_PORT: String(port),
        ...deliveryEnv,
      }),
    );
  }
  bus = await Bus.connect({
    url: p.nats.url,
    name: "limits-test",
    telemetry: createTelemetry({ service: "limits-test", logLevel: "silent", defaultMetrics: false }),
  });
  return { router, workers };
}

/** Queues a message on the spool as mx does (body attached). */
async function spool(to: string): Promise<void> {
  const queueId = newQueueId();
  const bytes = Buffer.from(
    `From: <sender@example.test>\r\nTo: <${to}>\r\nSubject: limits\r\nMessage-ID: <${queueId}@example.test>\r\n\r\nHello.\r\n`,
  );
  const mail: QueuedMail = {
    v: 1,
    queueId,
    source: "msa",
    receivedAt: new Date().toISOString(),
    envelope: {
      mailFrom: "sender@example.test",
      rcptTo: [{ address: to }],
      smtputf8: false,
      bodyType: "7BIT",
    },
    body: { attached: true, size: bytes.length, sha256: createHash("sha256").update(bytes).digest("hex") },
    messageId: `<${queueId}@example.test>`,
  };
  await bus!.publish(subjects.queued(), QueuedMail, mail, { msgId: queueId, attachment: bytes });
}

/** One sample of the router's destination gauges for a site label. */
async function gauges(router: ServiceHandle, site: string) {
  const text = await (await fetch(router.url("/metrics"))).text();
  const value = (name: string) =>
    Number(
      text
        .split("\n")
        .find((l) => l.startsWith(`mailpipe_${name}{`) && l.includes(`site="${site}"`))
        ?.split(" ")
        .pop() ?? 0,
    );
  return { inUse: value("destination_slots_in_use"), waiting: value("destination_waiting_recipients") };
}

const unique = (x: SmtpPeer) => new Set(x.messages.flatMap((m) => m.rcptTo));

describe("cluster-wide destination limits", () => {
  it("holds one site to 5 transactions across 3 workers, two domains sharing it, without delaying another destination", async () => {
    const { router } = await pipeline({ DESTINATION_LIMITS: '{"mx:mx.slow.test": {"connections": 5}}' });
    const slow = peer("127.0.0.2");
    const fast = peer("127.0.0.3");
    slow.setScript({ data: { delayMs: 2000 } });

    const slowRcpts = Array.from({ length: 30 }, (_, i) => `u${i}@slow-${i % 2 ? "a" : "b"}.test`);
    for (const to of slowRcpts) await spool(to);
    const fastRcpts = Array.from({ length: 10 }, (_, i) => `f${i}@fast.test`);
    for (const to of fastRcpts) await spool(to);

    let maxInUse = 0;
    let maxWaiting = 0;
    const sampler = setInterval(async () => {
      const g = await gauges(router, "mx.slow.test").catch(() => ({ inUse: 0, waiting: 0 }));
      maxInUse = Math.max(maxInUse, g.inUse);
      maxWaiting = Math.max(maxWaiting, g.waiting);
    }, 200);
    try {
      // the other destination is served while the slow site works through its line
      await fast.waitForMessages(10, 30_000);
      expect(slow.messages.length).toBeLessThan(30);
      await waitFor(() => unique(slow).size === 30, { timeoutMs: 90_000, message: "30 slow recipients" });
    } finally {
      clearInterval(sampler);
    }
    expect([...unique(slow)].sort()).toEqual([...slowRcpts].sort());
    expect([...unique(fast)].sort()).toEqual([...fastRcpts].sort());
    console.log(
      `slow site: at most ${slow.maxActiveTransactions} transactions and ${slow.maxOpenConnections} connections at once; ` +
        `router gauges: up to ${maxInUse} slots in use, ${maxWaiting} recipients waiting`,
    );
    expect(slow.maxActiveTransactions).toBeLessThanOrEqual(5);
    expect(slow.maxActiveTransactions).toBeGreaterThan(1);
    // the limit is the cluster's: the sessions came from more than one worker
    expect(new Set(slow.messages.map((m) => m.helo)).size).toBeGreaterThan(1);
    expect(maxInUse).toBeLessThanOrEqual(5);
    expect(maxWaiting).toBeGreaterThan(0);
    await waitFor(async () => (await gauges(router, "mx.slow.test")).inUse === 0, {
      message: "every slot released",
    });
  });

  it("holds a rate of 60 messages a minute across 3 workers within 10% over 30 s", async () => {
    await pipeline({ DESTINATION_LIMITS: '{"rate.test": {"rate": "60/min"}}' });
    const rated = peer("127.0.0.4");
    for (let i = 0; i < 40; i++) await spool(`r${i}@rate.test`);
    // after a quiet time the rate lets two start together (README): the window opens at the second
    const burst = await rated.waitForMessages(2, 30_000);
    const start = burst[1]!.at.getTime();
    await waitFor(() => Date.now() > start + 30_500, { timeoutMs: 45_000, message: "30 s window" });
    const inWindow = rated.messages.filter(
      (m) => m.at.getTime() >= start && m.at.getTime() < start + 30_000,
    ).length;
    console.log(`rate.test at 60/min: ${inWindow} messages in 30 s (expected 30)`);
    expect(inWindow).toBeGreaterThanOrEqual(27);
    expect(inWindow).toBeLessThanOrEqual(33);
    expect(new Set(rated.messages.map((m) => m.helo)).size).toBeGreaterThan(1);
  });

  it("gets back the slots of a SIGKILLed worker and delivers the waiting mail, never above the limit", async () => {
    const { router, workers } = await pipeline(
      { DESTINATION_LIMITS: '{"mx:mx.slow.test": {"connections": 3}}', DESTINATION_SLOT_LEASE: "2s" },
      { DELIVERY_ACK_WAIT: "2s" },
    );
    const slow = peer("127.0.0.2");
    const inData = new Set<string>();
    slow.setScript({
      data: (ctx) => {
        if (ctx.helo) inData.add(ctx.helo);
        return { delayMs: 3000 };
      },
    });
    const rcpts = Array.from({ length: 12 }, (_, i) => `k${i}@slow-a.test`);
    for (const to of rcpts) await spool(to);
    await waitFor(() => slow.activeTransactions === 3 && inData.size > 0, {
      timeoutMs: 30_000,
      message: "three transactions in DATA",
    });
    const helo = [...inData][0]!;
    const victim = workers[Number(/^w(\d)/.exec(helo)![1]) - 1]!;
    await victim.kill();

    await waitFor(() => unique(slow).size === 12, { timeoutMs: 90_000, message: "all 12 recipients" });
    expect([...unique(slow)].sort()).toEqual([...rcpts].sort());
    // a killed transaction may have reached the peer's end of data: one extra copy at most, per crash
    expect(slow.messages.length).toBeLessThanOrEqual(12 + 3);
    expect(slow.maxActiveTransactions).toBeLessThanOrEqual(3);
    await waitFor(
      async () => {
        const g = await gauges(router, "mx.slow.test");
        return g.inUse === 0 && g.waiting === 0;
      },
      { timeoutMs: 30_000, message: "every slot back, nobody waiting" },
    );
  });
});
