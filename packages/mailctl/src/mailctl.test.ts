import { createSign, verify } from "node:crypto";
import { readFileSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Bus } from "@mailpipe/bus";
import { newQueueId } from "@mailpipe/contracts";
import { Directory, developmentDirectory } from "@mailpipe/directory";
import { createTelemetry } from "@mailpipe/telemetry";
import { type NatsHandle, startNats, tempDir } from "@mailpipe/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { testIo as io } from "../test/io.ts";
import { run } from "./cli.ts";
import { eventsOfMessage, indexedQueueIds, readEvents } from "./track.ts";

let dir: { path: string; remove(): Promise<void> };
let file: string;
beforeAll(async () => {
  dir = await tempDir("mailctl");
  file = join(dir.path, "directory.yaml");
  await writeFile(file, await developmentDirectory());
});
afterAll(async () => {
  await dir.remove();
});

describe("mailctl user", () => {
  it("adds a user with a password read from stdin, stored only as a scrypt hash", async () => {
    const t = io("carol-long-password\n", { DIRECTORY_FILE: file });
    expect(await run(["user", "add", "carol@example.test", "--quota", "200M"], t.io)).toBe(0);
    expect(t.out()).toMatch(/added carol@example\.test/);
    const text = readFileSync(file, "utf8");
    expect(text).not.toContain("carol-long-password");
    expect(text).toMatch(/carol@example\.test:[\s\S]*\$scrypt\$/);
    const d = await Directory.load(file);
    expect(await d.verifyPassword("carol@example.test", "carol-long-password")).toBe(true);
    expect(await d.verifyPassword("carol@example.test", "wrong")).toBe(false);
    expect(d.quota("carol@example.test")).toBe(200 * 1024 * 1024);
  });

  it("changes a password and refuses short ones and unknown users", async () => {
    const t = io("another-long-password\n", { DIRECTORY_FILE: file });
    expect(await run(["user", "passwd", "bob@example.test"], t.io)).toBe(0);
    const d = await Directory.load(file);
    expect(await d.verifyPassword("bob@example.test", "another-long-password")).toBe(true);

    const short = io("short\n", { DIRECTORY_FILE: file });
    expect(await run(["user", "passwd", "bob@example.test"], short.io)).toBe(1);
    expect(short.err()).toMatch(/too short.*nothing was changed/);

    const unknown = io("whatever-long-password\n", { DIRECTORY_FILE: file });
    expect(await run(["user", "passwd", "nobody@example.test"], unknown.io)).toBe(1);
    expect(unknown.err()).toMatch(/no user nobody@example\.test/);

    const otherDomain = io("whatever-long-password\n", { DIRECTORY_FILE: file });
    expect(await run(["user", "add", "x@not-ours.test"], otherDomain.io)).toBe(1);
    expect(otherDomain.err()).toMatch(/not-ours\.test/);
  });

  it("prints usage for a bad command", async () => {
    const t = io("", { DIRECTORY_FILE: file });
    expect(await run(["frobnicate"], t.io)).toBe(2);
    expect(t.err()).toMatch(/unknown command "frobnicate"[\s\S]*mailctl user add/);
  });
});

describe("mailctl dkim keygen", () => {
  it("creates a key, sets it in the directory and prints the TXT record that verifies it", async () => {
    const t = io("", { DIRECTORY_FILE: file });
    expect(await run(["dkim", "keygen", "example.test", "--selector", "s2026"], t.io)).toBe(0);
    const record = /^s2026\._domainkey\.example\.test\. 3600 IN TXT (.*)$/m.exec(t.out());
    expect(record).not.toBeNull();
    const txt = [...record![1]!.matchAll(/"([^"]*)"/g)].map((m) => m[1]).join("");
    expect(txt).toMatch(/^v=DKIM1; k=rsa; p=/);
    const d = await Directory.load(file);
    const key = d.dkim("example.test")!;
    expect(key.selector).toBe("s2026");
    // the printed public key verifies a signature made with the stored private key
    const pub = `-----BEGIN PUBLIC KEY-----\n${txt.split("p=")[1]}\n-----END PUBLIC KEY-----`;
    const sig = createSign("sha256").update("hello").sign(key.privateKey);
    expect(verify("sha256", Buffer.from("hello"), pub, sig)).toBe(true);

    const again = io("", { DIRECTORY_FILE: file });
    expect(await run(["dkim", "keygen", "example.test", "--selector", "s2026"], again.io)).toBe(1);
    expect(again.err()).toMatch(/exists: pick another --selector/);
  });
});

describe("mailctl track", () => {
  let nats: NatsHandle;
  beforeAll(async () => {
    nats = await startNats();
  });
  afterAll(async () => {
    await nats.stop();
  });

  it("prints a message's timeline from the events stream, in order, with its trace id", async () => {
    const telemetry = createTelemetry({ service: "mx", logLevel: "silent", defaultMetrics: false });
    const bus = await Bus.connect({ url: nats.url, name: "t", telemetry });
    await bus.ensureTopology();
    const queueId = newQueueId();
    const other = newQueueId();
    const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
    const t0 = Date.now();
    const at = (ms: number) => new Date(t0 + ms).toISOString();
    bus.emit({
      type: "received",
      queueId,
      at: at(0),
      traceId,
      messageId: "<m1@example.test>",
      mailFrom: "alice@example.test",
      client: { ip: "127.0.0.1" },
      size: 2048,
    });
    bus.emit({ type: "queued", queueId, at: at(5), traceId });
    bus.emit({
      type: "routed",
      queueId,
      // the router may route before the edge has JetStream's ack and says "queued"
      at: at(4),
      traceId,
      recipients: ["bob@remote.test"],
      destination: "remote.test",
    });
    bus.emit({
      type: "deferred",
      queueId,
      at: at(30),
      traceId,
      recipient: "bob@remote.test",
      attempt: 1,
      reply: { code: 451, enhanced: "4.7.1", text: "try later" },
      remoteMta: "mx1.remote.test [127.0.0.2]",
    });
    bus.emit({
      type: "delivered",
      queueId,
      at: at(20),
      traceId,
      recipient: "bob@remote.test",
      attempt: 2,
      reply: { code: 250, enhanced: "2.0.0", text: "ok" },
      remoteMta: "mx1.remote.test [127.0.0.2]",
      tls: {
        policy: "verify",
        source: "mta-sts",
        version: "TLSv1.3",
        cipher: "TLS_AES_256_GCM_SHA384",
        verified: true,
      },
    });
    bus.emit({
      type: "received",
      queueId: other,
      at: at(1),
      messageId: "<m2@example.test>",
      mailFrom: "carol@example.test",
    });
    // what acceptance indexes: the Message-ID, the sender and the envelope recipients
    bus.index(queueId, {
      messageId: "<m1@example.test>",
      addresses: ["alice@example.test", "bob@remote.test"],
    });
    bus.index(other, { messageId: "<m2@example.test>", addresses: ["carol@example.test"] });
    await bus.nc.flush();
    await bus.close();

    const t = io("", { NATS_URL: nats.url, TRACE_VIEW_URL: "http://jaeger:16686/trace/{traceId}" });
    expect(await run(["track", queueId], t.io)).toBe(0);
    const text = t.out();
    expect(text).toContain(`message ${queueId}  Message-ID <m1@example.test>  from <alice@example.test>`);
    const order = ["received", "queued", "routed", "delivered", "deferred"].map((type) =>
      text.indexOf(` ${type} `),
    );
    expect(order.every((i) => i > 0)).toBe(true);
    // the edge's events first, then the rest by time, as emitted times say
    expect([...order].sort((a, b) => a - b)).toEqual(order);
    expect(text).toContain('"451 4.7.1 try later"  by mx1.remote.test [127.0.0.2]');
    expect(text).toContain(
      "by mx1.remote.test [127.0.0.2]  TLSv1.3 TLS_AES_256_GCM_SHA384 (verify, mta-sts, verified)",
    );
    expect(text).toContain(`trace ${traceId}  http://jaeger:16686/trace/${traceId}`);
    expect(text).not.toContain(other);

    const byMessageId = io("", { NATS_URL: nats.url });
    expect(await run(["track", "<m1@example.test>"], byMessageId.io)).toBe(0);
    expect(byMessageId.out()).toContain(`message ${queueId}`);

    const byRecipient = io("", { NATS_URL: nats.url });
    expect(await run(["track", "bob@remote.test", "--json"], byRecipient.io)).toBe(0);
    const json = JSON.parse(byRecipient.out());
    expect(json).toHaveLength(1);
    expect(json[0].queueId).toBe(queueId);
    expect(json[0].events).toHaveLength(5);

    const none = io("", { NATS_URL: nats.url });
    expect(await run(["track", "nobody@nowhere.test"], none.io)).toBe(1);
    expect(none.err()).toMatch(/no events for nobody@nowhere\.test/);
  });

  it("reads only the message's own events and index entries, not the whole stream", async () => {
    const telemetry = createTelemetry({ service: "mx", logLevel: "silent", defaultMetrics: false });
    const bus = await Bus.connect({ url: nats.url, name: "t", telemetry });
    await bus.ensureTopology();
    // 2,000 other messages with 3 events each, and the one looked up among them
    const target = newQueueId();
    for (let i = 0; i < 2000; i++) {
      const id = newQueueId();
      bus.emit({
        type: "received",
        queueId: id,
        messageId: `<other${i}@example.test>`,
        mailFrom: "x@example.test",
      });
      bus.emit({ type: "queued", queueId: id });
      bus.emit({ type: "delivered", queueId: id, recipient: "y@example.test" });
      bus.index(id, {
        messageId: `<other${i}@example.test>`,
        addresses: ["x@example.test", "y@example.test"],
      });
      if (i === 1000) {
        bus.emit({
          type: "received",
          queueId: target,
          messageId: "<needle@example.test>",
          mailFrom: "n@example.test",
        });
        bus.emit({ type: "queued", queueId: target });
        bus.emit({ type: "delivered", queueId: target, recipient: "needle@example.test" });
        bus.index(target, {
          messageId: "<needle@example.test>",
          addresses: ["n@example.test", "needle@example.test"],
        });
      }
    }
    await bus.nc.flush();
    const stats = { read: 0 };
    const events = await eventsOfMessage(bus.nc, target, stats);
    expect(events.map((e) => e.type)).toEqual(["received", "queued", "delivered"]);
    // its bucket's events only: its own 3, and rarely another message's that shares the bucket
    expect(stats.read).toBeGreaterThanOrEqual(3);
    expect(stats.read).toBeLessThan(20);
    const ids = { read: 0 };
    const since = new Date(Date.now() - 3_600_000);
    expect(
      await indexedQueueIds(bus.nc, { kind: "messageId", value: "<needle@example.test>" }, since, ids),
    ).toEqual([target]);
    expect(
      await indexedQueueIds(bus.nc, { kind: "recipient", value: "NEEDLE@example.test" }, since, ids),
    ).toEqual([target]);
    expect(ids.read).toBeGreaterThanOrEqual(2);
    expect(ids.read).toBeLessThan(20);
    // the scan, for contrast, reads everything in its window
    const scan = { read: 0 };
    await readEvents(bus.nc, since, 1_000_000, scan);
    expect(scan.read).toBeGreaterThan(6000);
    await bus.close();
  });

  it("finds events from before the index with --scan, and says so without it", async () => {
    const telemetry = createTelemetry({ service: "mx", logLevel: "silent", defaultMetrics: false });
    const bus = await Bus.connect({ url: nats.url, name: "t", telemetry });
    await bus.ensureTopology();
    const queueId = newQueueId();
    // an event as releases before the index published it: on mail.v1.events.<type>, no index entry
    const legacy = {
      v: 1,
      type: "received",
      at: new Date().toISOString(),
      service: "mx",
      queueId,
      messageId: "<old@example.test>",
      mailFrom: "old@example.test",
    };
    bus.nc.publish("mail.v1.events.received", JSON.stringify(legacy));
    await bus.nc.flush();
    await bus.close();

    const plain = io("", { NATS_URL: nats.url });
    expect(await run(["track", "<old@example.test>"], plain.io)).toBe(1);
    expect(plain.err()).toMatch(/--scan/);
    const scanned = io("", { NATS_URL: nats.url });
    expect(await run(["track", "<old@example.test>", "--scan"], scanned.io)).toBe(0);
    expect(scanned.out()).toContain(
      `message ${queueId}  Message-ID <old@example.test>  from <old@example.test>`,
    );
    const byId = io("", { NATS_URL: nats.url });
    expect(await run(["track", queueId, "--scan"], byId.io)).toBe(0);
    expect(byId.out()).toContain(`message ${queueId}`);
  });

  it("says clearly when NATS cannot be reached", async () => {
    const t = io("", { NATS_URL: "nats://127.0.0.1:1" });
    expect(await run(["track", newQueueId()], t.io)).toBe(1);
    expect(t.err()).toMatch(/cannot reach NATS at nats:\/\/127\.0\.0\.1:1/);
  });
});
