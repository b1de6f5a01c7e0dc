import type { Bus } from "@mailpipe/bus";
import { InMemorySpanExporter, type Telemetry } from "@mailpipe/telemetry";
import { type NatsHandle, sequence, startNats } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  collectStatuses,
  connectBus,
  message,
  mx,
  publishRequest,
  quietTelemetry,
  resetBus,
  startPeers,
  testConfig,
} from "../test/helpers.ts";
import type { Config } from "./config.ts";
import { type RunningDelivery, startDelivery } from "./service.ts";
import { createWorker } from "./worker.ts";

let nats: NatsHandle;
let admin: Bus;
const cleanups: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  nats = await startNats();
  admin = await connectBus(nats.url);
});
afterAll(async () => {
  await admin?.close();
  await nats?.stop();
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  await resetBus(admin);
});

async function peers(hosts: string[], options?: Parameters<typeof startPeers>[1]) {
  const started = await startPeers(hosts, options);
  cleanups.push(() => Promise.all(started.peers.map((p) => p.stop())));
  return started;
}

async function worker(
  port: number,
  env: Record<string, string> = {},
  exporter?: InMemorySpanExporter,
): Promise<{ delivery: RunningDelivery; config: Config; bus: Bus; telemetry: Telemetry }> {
  const telemetry = quietTelemetry(exporter);
  const bus = await connectBus(nats.url, telemetry);
  const config = testConfig(nats.url, port, env);
  const delivery = await startDelivery({ config, bus, telemetry });
  cleanups.push(async () => {
    await delivery.stop();
    await bus.close();
  });
  return { delivery, config, bus, telemetry };
}

/** The value of a counter sample in the Prometheus text, 0 when absent. */
async function metric(telemetry: Telemetry, name: string, labels: string): Promise<number> {
  const text = await telemetry.metrics.text();
  const line = text.split("\n").find((l) => l.startsWith(`mailpipe_${name}{`) && l.includes(labels));
  return line ? Number(line.split(" ").pop()) : 0;
}

async function statuses() {
  const c = await collectStatuses(admin);
  cleanups.push(() => c.stop());
  return c;
}

describe("delivery", () => {
  it("delivers one message byte-exact to the first MX with every envelope recipient", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"]);
    const exporter = new InMemorySpanExporter();
    await worker(port, {}, exporter);
    const seen = await statuses();
    const body = message("byte exact", "bob@remote.test, carol@remote.test");
    const req = await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test", "carol@remote.test"],
      body,
    });

    const [got] = await peer!.waitForMessages(1);
    expect(got!.raw.toString("utf8")).toBe(body);
    expect(got!.rcptTo).toEqual(["bob@remote.test", "carol@remote.test"]);
    expect(got!.mailFrom).toBe("alice@sender.test");
    expect(got!.helo).toBe("out.sender.test");

    const all = await seen.waitFor(2);
    expect(all.map((s) => s.status.recipient).sort()).toEqual(["bob@remote.test", "carol@remote.test"]);
    for (const { status, subject, worker } of all) {
      expect(subject).toBe("mail.v1.status.delivered");
      expect(status).toMatchObject({
        outcome: "delivered",
        service: "delivery",
        queueId: req.queueId,
        dispatchId: req.dispatchId,
        attempt: 1,
        destination: "remote.test",
        remoteMta: "mx1.remote.test [127.0.0.2]",
      });
      expect(status.reply.code).toBe(250);
      expect(worker).toMatch(/^out\.sender\.test\/\d+$/);
    }

    // a CLIENT span per transaction with a child per address tried; no local parts in them
    await new Promise((r) => setTimeout(r, 100));
    const spans = exporter.getFinishedSpans();
    const deliver = spans.find((s) => s.name === "smtp.deliver");
    const connect = spans.find((s) => s.name === "smtp.connect");
    expect(deliver?.attributes["mail.destination"]).toBe("remote.test");
    expect(connect?.parentSpanContext?.spanId).toBe(deliver?.spanContext().spanId);
    expect(connect?.attributes).toMatchObject({
      "server.address": "mx1.remote.test",
      "network.peer.address": "127.0.0.2",
      "mail.mx.host": "mx1.remote.test",
      "smtp.reply.code": 250,
    });
    const ours = spans.filter((s) => s.name.startsWith("smtp."));
    expect(JSON.stringify(ours.map((s) => [s.attributes, s.events, s.status]))).not.toMatch(/bob|carol/);
  });

  it("sends MAIL FROM:<> for the null sender", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"]);
    await worker(port);
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test"],
      mailFrom: "",
      body: message("bounce"),
    });
    const [got] = await peer!.waitForMessages(1);
    expect(got!.mailFrom).toBe("");
  });

  it("uses MX hosts in order, and the next one when the first refuses connections", async () => {
    const {
      port,
      peers: [mx1, mx2],
    } = await peers(["127.0.0.2", "127.0.0.3"]);
    await worker(port);
    const seen = await statuses();
    const hosts = [mx("mx1.remote.test", 10, "127.0.0.2"), mx("mx2.remote.test", 20, "127.0.0.3")];
    await publishRequest(admin, {
      domain: "remote.test",
      hosts,
      recipients: ["bob@remote.test"],
      body: message("1"),
    });
    await mx1!.waitForMessages(1);
    expect(mx2!.messages).toHaveLength(0);

    // nothing listens on 127.0.0.9 at that port: connection refused, then mx2
    const refused = [mx("mx0.remote.test", 5, "127.0.0.9"), mx("mx2.remote.test", 20, "127.0.0.3")];
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: refused,
      recipients: ["carol@remote.test"],
      body: message("2"),
    });
    const [got] = await mx2!.waitForMessages(1);
    expect(got!.rcptTo).toEqual(["carol@remote.test"]);
    const [, second] = await seen.waitFor(2);
    expect(second!.status).toMatchObject({ outcome: "delivered", remoteMta: "mx2.remote.test [127.0.0.3]" });
  });

  it("defers with 451 4.4.1 when no host accepts a connection", async () => {
    const { port } = await peers(["127.0.0.2"]);
    await worker(port);
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.9"), mx("mx2.remote.test", 20, "127.0.0.10")],
      recipients: ["bob@remote.test"],
      body: message("nobody home"),
    });
    const [s] = await seen.waitFor(1);
    expect(s!.subject).toBe("mail.v1.status.deferred");
    expect(s!.status.reply).toMatchObject({ code: 451, enhanced: "4.4.1" });
    expect(s!.status.reply.text).toMatch(/refused/);
    expect(s!.status.remoteMta).toBe("mx2.remote.test [127.0.0.10]");
  });

  it("bounces the recipient refused at RCPT and delivers the other", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"], () => ({
      script: {
        rcpt: (ctx) =>
          ctx.recipient === "nobody@remote.test"
            ? { reply: 550, text: "5.1.1 <nobody@remote.test>: user unknown" }
            : "accept",
      },
    }));
    await worker(port);
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["nobody@remote.test", "bob@remote.test"],
      body: message("partly"),
    });
    await seen.waitFor(2);
    expect(seen.of("nobody@remote.test")[0]!.status).toMatchObject({
      outcome: "bounced",
      reply: { code: 550, enhanced: "5.1.1", text: "<nobody@remote.test>: user unknown" },
      remoteMta: "mx1.remote.test [127.0.0.2]",
    });
    expect(seen.of("bob@remote.test")[0]!.status.outcome).toBe("delivered");
    expect(peer!.messages[0]!.rcptTo).toEqual(["bob@remote.test"]);
  });

  it("defers every recipient when DATA is answered 451", async () => {
    const { port } = await peers(["127.0.0.2"], () => ({
      script: { data: { reply: 451, text: "4.3.0 Try again later" } },
    }));
    await worker(port);
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test", "carol@remote.test"],
      body: message("data 451"),
    });
    const all = await seen.waitFor(2);
    for (const s of all) {
      expect(s.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.3.0" } });
    }
  });

  it("bounces every accepted recipient when the end of data is answered 554", async () => {
    const { port } = await peers(["127.0.0.2"], () => ({
      script: { data: { reply: 554, text: "5.7.1 Spam" } },
    }));
    await worker(port);
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test"],
      body: message("spam"),
    });
    const [s] = await seen.waitFor(1);
    expect(s!.status).toMatchObject({
      outcome: "bounced",
      reply: { code: 554, enhanced: "5.7.1", text: "Spam" },
    });
  });

  it("goes to mx2 when mx1 greets with 421", async () => {
    const {
      port,
      peers: [mx1, mx2],
    } = await peers(["127.0.0.2", "127.0.0.3"], (host) =>
      host === "127.0.0.2" ? { script: { connect: { reply: 421, text: "4.3.2 Too busy" } } } : {},
    );
    await worker(port);
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2"), mx("mx2.remote.test", 20, "127.0.0.3")],
      recipients: ["bob@remote.test"],
      body: message("busy mx1"),
    });
    await mx2!.waitForMessages(1);
    expect(mx1!.messages).toHaveLength(0);
    expect(mx1!.connections).toBeGreaterThan(0);
    const [s] = await seen.waitFor(1);
    expect(s!.status.remoteMta).toBe("mx2.remote.test [127.0.0.3]");
  });

  it("bounces when every host refuses the sender with 5xx, and defers when one only said 4xx", async () => {
    const { port } = await peers(["127.0.0.2", "127.0.0.3"], (host) => ({
      script: {
        mail:
          host === "127.0.0.2"
            ? { reply: 550, text: "5.7.1 Sender blocked" }
            : { reply: 553, text: "5.7.1 No" },
      },
    }));
    await worker(port);
    const seen = await statuses();
    const hosts = [mx("mx1.remote.test", 10, "127.0.0.2"), mx("mx2.remote.test", 20, "127.0.0.3")];
    await publishRequest(admin, {
      domain: "remote.test",
      hosts,
      recipients: ["bob@remote.test"],
      body: message("a"),
    });
    const [first] = await seen.waitFor(1);
    expect(first!.status).toMatchObject({
      outcome: "bounced",
      reply: { code: 553, enhanced: "5.7.1" },
      remoteMta: "mx2.remote.test [127.0.0.3]",
    });

    const mixed = [mx("mx1.remote.test", 10, "127.0.0.2"), mx("mx0.remote.test", 20, "127.0.0.9")];
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: mixed,
      recipients: ["carol@remote.test"],
      body: message("b"),
    });
    const [, second] = await seen.waitFor(2);
    expect(second!.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.4.1" } });
  });

  it("uses STARTTLS when offered, and falls back to plaintext when the handshake fails", async () => {
    const {
      port,
      peers: [tlsPeer, brokenTls],
    } = await peers(["127.0.0.2", "127.0.0.3"], (host) => ({
      starttls: true,
      // a server that only speaks TLS 1.0 fails the handshake with any current client
      ...(host === "127.0.0.3" ? { smtpOptions: { minVersion: "TLSv1", maxVersion: "TLSv1" } } : {}),
    }));
    const exporter = new InMemorySpanExporter();
    await worker(port, {}, exporter);
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test"],
      body: message("tls"),
    });
    const [secured] = await tlsPeer!.waitForMessages(1);
    expect(secured!.tls).toBe(true);

    await publishRequest(admin, {
      domain: "old.test",
      hosts: [mx("mx.old.test", 10, "127.0.0.3")],
      recipients: ["bob@old.test"],
      body: message("fallback", "bob@old.test"),
    });
    const [plain] = await brokenTls!.waitForMessages(1);
    expect(plain!.tls).toBe(false);
    expect(brokenTls!.connections).toBe(2); // the failed handshake, then the plaintext session
    const all = await seen.waitFor(2);
    expect(all.every((s) => s.status.outcome === "delivered")).toBe(true);

    const connects = exporter.getFinishedSpans().filter((s) => s.name === "smtp.connect");
    const tlsSpan = connects.find((s) => s.attributes["network.peer.address"] === "127.0.0.2");
    expect(tlsSpan?.attributes["tls.protocol.version"]).toMatch(/^1\.[23]$/);
    expect(tlsSpan?.events.map((e) => e.name)).toContain("starttls");
    const fallbackSpan = connects.find((s) => s.attributes["network.peer.address"] === "127.0.0.3");
    expect(fallbackSpan?.events.map((e) => e.name)).toContain("starttls.failed");
  });

  it("does not fall back to plaintext when SMTP_TLS_FALLBACK_PLAIN=false", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"], () => ({
      starttls: true,
      smtpOptions: { minVersion: "TLSv1", maxVersion: "TLSv1" },
    }));
    await worker(port, { SMTP_TLS_FALLBACK_PLAIN: "false" });
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test"],
      body: message("no fallback"),
    });
    const [s] = await seen.waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(peer!.messages).toHaveLength(0);
  });

  it("with SMTP_TLS_VERIFY=true, refuses a certificate that does not verify and never retries in plaintext", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"], () => ({ starttls: true }));
    await worker(port, { SMTP_TLS_VERIFY: "true" });
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test"],
      body: message("verify"),
    });
    const [s] = await seen.waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(peer!.connections).toBe(1);
    expect(peer!.messages).toHaveLength(0);
  });

  it("reuses connections: 20 messages to one peer over far fewer than 20 connections", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"], () => ({ starttls: true }));
    const { telemetry } = await worker(port, { DELIVERY_CONCURRENCY: "4" });
    const seen = await statuses();
    for (let i = 0; i < 20; i++) {
      await publishRequest(admin, {
        domain: "remote.test",
        hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
        recipients: [`user${i}@remote.test`],
        body: message(`burst ${i}`, `user${i}@remote.test`),
      });
    }
    await peer!.waitForMessages(20, 20_000);
    const all = await seen.waitFor(20);
    expect(all.every((s) => s.status.outcome === "delivered")).toBe(true);
    expect(new Set(peer!.messages.map((m) => m.rcptTo[0])).size).toBe(20);
    expect(peer!.messages.every((m) => m.tls)).toBe(true);
    expect(peer!.connections).toBeLessThanOrEqual(8);
    expect(await metric(telemetry, "delivery_connections_total", 'reused="true"')).toBeGreaterThanOrEqual(12);
    expect(await metric(telemetry, "delivery_outcomes_total", 'outcome="delivered"')).toBe(20);
  });

  it("labels outcomes by destination for the first METRICS_MAX_DESTINATIONS destinations, the rest as other", async () => {
    const { port } = await peers(["127.0.0.2"]);
    const { telemetry } = await worker(port, { METRICS_MAX_DESTINATIONS: "2" });
    const seen = await statuses();
    // one after the other, so which destinations come first is certain
    const domains = ["d1.test", "d2.test", "d3.test", "d4.test", "d1.test", "d5.test"];
    for (const [i, domain] of domains.entries()) {
      await publishRequest(admin, {
        domain,
        hosts: [mx(`mx.${domain}`, 10, "127.0.0.2")],
        recipients: [`user${i}@${domain}`],
        body: message(`to ${domain}`, `user${i}@${domain}`),
      });
      await seen.waitFor(i + 1);
    }
    const text = await telemetry.metrics.text();
    const series = text.split("\n").filter((l) => l.startsWith("mailpipe_delivery_outcomes_total{"));
    const byDestination = Object.fromEntries(
      series.map((l) => [/destination="([^"]*)"/.exec(l)?.[1], Number(l.split(" ").pop())]),
    );
    expect(byDestination).toEqual({ "d1.test": 2, "d2.test": 1, other: 3 });
  });

  it("retries nothing itself: a deferred recipient is reported once and acked", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"], () => ({
      script: { rcpt: sequence({ reply: 450, text: "4.2.0 Greylisted" }, "accept") },
    }));
    await worker(port);
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test"],
      body: message("greylisted"),
    });
    const [s] = await seen.waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "deferred", reply: { code: 450, enhanced: "4.2.0" } });
    await new Promise((r) => setTimeout(r, 1500));
    expect(peer!.transactions).toBe(1);
    expect(seen.seen).toHaveLength(1);
    const info = await admin.jsm.consumers.info("MAIL_DELIVER", "delivery");
    expect(info.num_ack_pending + info.num_pending).toBe(0);
  });

  it("throws when statuses cannot be published, and reports the same results on redelivery without resending", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"]);
    const telemetry = quietTelemetry();
    let failing = true;
    const w = createWorker({
      config: testConfig(nats.url, port),
      bus: {
        publish: ((...args: Parameters<Bus["publish"]>) =>
          failing
            ? Promise.reject(new Error("JetStream unavailable"))
            : admin.publish(...args)) as Bus["publish"],
        emit: admin.emit.bind(admin),
      },
      bodies: await admin.bodies(),
      telemetry,
    });
    cleanups.push(() => w.close());
    const seen = await statuses();
    const request = await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test"],
      body: message("status outage"),
    });

    await expect(w.handle(request)).rejects.toThrow(/JetStream unavailable/);
    expect(peer!.messages).toHaveLength(1);
    failing = false;
    await w.handle(request);
    const [s] = await seen.waitFor(1);
    expect(s!.status).toMatchObject({ recipient: "bob@remote.test", outcome: "delivered" });
    expect(peer!.transactions).toBe(1);
  });
});
