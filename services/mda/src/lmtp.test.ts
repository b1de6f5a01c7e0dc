// MDA_BACKEND=lmtp against a real Dovecot (LMTP, Sieve, quota), read back over IMAP.
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Writable } from "node:stream";
import { Bus, type Subscription } from "@mailpipe/bus";
import {
  type BodyRef,
  decodeJson,
  LocalDeliveryRequest,
  newQueueId,
  RecipientStatus,
  subjects,
  topology,
} from "@mailpipe/contracts";
import { watchDirectory } from "@mailpipe/directory";
import { createTelemetry } from "@mailpipe/telemetry";
import {
  type DovecotHandle,
  imapFetchAll,
  type NatsHandle,
  type ServerHandle,
  type SmtpPeer,
  startDovecot,
  startNats,
  startRedis,
  startSmtpPeer,
  tempDir,
  waitFor,
} from "@mailpipe/testing";
import { AckPolicy } from "@nats-io/jetstream";
import { Redis } from "ioredis";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { config } from "./config.ts";
import { createDeliverer, doneKey } from "./deliver.ts";
import { LmtpClient, parseLmtpUrl, replyFromLine } from "./lmtp.ts";

let nats: NatsHandle;
let redisServer: ServerHandle;
let redis: Redis;
let router: Bus;
let dovecot: DovecotHandle;
let submission: SmtpPeer; // where Dovecot sends Sieve rejections
const PASSWORD = "secret";

const quiet = (service: "router" | "mda") =>
  createTelemetry({
    service,
    logDestination: new Writable({ write: (_c, _e, cb) => cb() }),
    defaultMetrics: false,
  });

beforeAll(async () => {
  [nats, redisServer, submission] = await Promise.all([startNats(), startRedis(), startSmtpPeer()]);
  dovecot = await startDovecot({
    submissionHost: `${submission.host}:${submission.port}`,
    users: [
      { address: "alice@example.test" },
      { address: "bob@example.test" },
      {
        address: "lists@example.test",
        sieve: `require ["fileinto"];\nif header :contains "List-Id" "announce.example.org" { fileinto "Lists"; }\n`,
      },
      {
        address: "picky@example.test",
        sieve: `require ["reject"];\nif header :contains "Subject" "buy now" { reject "I do not accept offers."; }\n`,
      },
      { address: "full@example.test", quota: "1K" },
      { address: "busy@example.test", quota: "1K", quotaTempfail: true },
      { address: "idem@example.test" },
      { address: "pool@example.test" },
    ],
  });
  redis = new Redis(redisServer.url);
  router = await Bus.connect({ url: nats.url, name: "test-router", telemetry: quiet("router") });
  await router.ensureTopology();
}, 60_000);

afterAll(async () => {
  await router?.close();
  redis?.disconnect();
  await Promise.all([nats?.stop(), redisServer?.stop(), dovecot?.stop(), submission?.stop()]);
});

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  for (const s of Object.values(topology.streams)) await router.jsm.streams.purge(s.name).catch(() => {});
  for (const c of [...Object.values(topology.consumers), { stream: "MAIL_STATUS", durable: "test-status" }]) {
    await router.jsm.consumers.delete(c.stream, c.durable).catch(() => {});
  }
  await redis.flushdb();
});

interface Harness {
  statuses: RecipientStatus[];
  sub: Subscription;
  lmtp: LmtpClient;
}

/** mda's handler with an LMTP client, consuming "mda" as the service does. */
async function harness(
  opts: { url?: string; poolSize?: number; failFirstPublish?: boolean } = {},
): Promise<Harness> {
  const tmp = await tempDir("mda-lmtp");
  cleanups.push(() => tmp.remove());
  const directoryFile = join(tmp.path, "directory.yaml");
  await writeFile(directoryFile, "domains:\n  example.test:\nusers:\n  alice@example.test: {}\n");
  const watcher = await watchDirectory(directoryFile, { fsWatch: false });
  cleanups.push(() => watcher.close());
  const mda = await Bus.connect({ url: nats.url, name: "test-mda", telemetry: quiet("mda") });
  cleanups.push(() => mda.close());
  const lmtp = new LmtpClient({
    target: parseLmtpUrl(opts.url ?? dovecot.lmtpUrl),
    name: "mda.example.test",
    poolSize: opts.poolSize ?? 4,
    timeoutMs: 30_000,
  });
  cleanups.push(() => lmtp.close());
  let failures = opts.failFirstPublish ? 1 : 0;
  const deliverer = createDeliverer({
    maildirRoot: join(tmp.path, "unused"),
    hostname: "mda.example.test",
    fsync: true,
    ackWaitMs: 2000,
    bus: {
      // the injection point: the status publish after Dovecot's 250, as if mda died right there
      publish: (...args: Parameters<Bus["publish"]>) => {
        if (failures > 0) {
          failures--;
          return Promise.reject(new Error("injected: the process died before the status went out"));
        }
        return mda.publish(...args);
      },
      emit: (e) => mda.emit(e),
    },
    bodies: await mda.bodies(),
    redis,
    directory: () => watcher.current(),
    telemetry: quiet("mda"),
    lmtp,
  });
  const sub = await mda.consume("mda", LocalDeliveryRequest, deliverer.handle, {
    maxInFlight: 8,
    ackWaitMs: 2000,
  });
  cleanups.push(() => sub.stop());

  const statuses: RecipientStatus[] = [];
  await router.jsm.consumers.add("MAIL_STATUS", {
    durable_name: "test-status",
    ack_policy: AckPolicy.Explicit,
    filter_subject: subjects.statusAll(),
  });
  const msgs = await (await router.js.consumers.get("MAIL_STATUS", "test-status")).consume();
  void (async () => {
    for await (const m of msgs) {
      statuses.push(decodeJson(RecipientStatus, m.data));
      m.ack();
    }
  })();
  cleanups.push(() => msgs.close());
  return { statuses, sub, lmtp };
}

async function send(
  body: string,
  recipients: LocalDeliveryRequest["recipients"],
  mailFrom = "sender@remote.test",
): Promise<LocalDeliveryRequest> {
  const queueId = newQueueId();
  const ref: BodyRef = await (await router.bodies()).put(queueId, Buffer.from(body));
  const req: LocalDeliveryRequest = {
    v: 1,
    queueId,
    dispatchId: `${queueId}.local.1`,
    receivedAt: new Date().toISOString(),
    mailFrom,
    recipients,
    body: ref,
  };
  await router.publish(subjects.deliverLocal(), LocalDeliveryRequest, req, { msgId: req.dispatchId });
  return req;
}

const rcpt = (address: string, mailbox = address, folder?: string) => ({
  mailbox,
  address,
  attempt: 1,
  ...(folder ? { folder } : {}),
});

const imap = (user: string, mailbox = "INBOX") =>
  imapFetchAll({ port: dovecot.imapPort, user, password: PASSWORD, mailbox });

describe("LMTP_URL", () => {
  it("takes unix:/path and lmtp://host:port, and refuses anything else", () => {
    expect(parseLmtpUrl("unix:/run/dovecot/lmtp")).toEqual({ kind: "unix", path: "/run/dovecot/lmtp" });
    expect(parseLmtpUrl("lmtp://dovecot:24")).toEqual({ kind: "tcp", host: "dovecot", port: 24 });
    expect(parseLmtpUrl("lmtp://127.0.0.1")).toEqual({ kind: "tcp", host: "127.0.0.1", port: 24 });
    expect(() => parseLmtpUrl("unix:relative/lmtp")).toThrow(/absolute path/);
    expect(() => parseLmtpUrl("smtp://host:25")).toThrow(/neither unix:\/path nor lmtp:\/\/host:port/);
  });

  it("is required with MDA_BACKEND=lmtp, which is off by default", () => {
    expect(config.parse({}).MDA_BACKEND).toBe("maildir");
    const r = config.safeParse({ MDA_BACKEND: "lmtp" });
    expect(r.success).toBe(false);
    expect(r.error?.issues.map((i) => [i.path.join("."), i.message])).toEqual([
      ["LMTP_URL", "MDA_BACKEND=lmtp needs LMTP_URL (unix:/path/to/socket or lmtp://host:port)"],
    ]);
    expect(config.parse({ MDA_BACKEND: "lmtp", LMTP_URL: "unix:/run/dovecot/lmtp" })).toMatchObject({
      LMTP_POOL_SIZE: 8,
      LMTP_TIMEOUT: 120_000,
    });
  });

  it("keeps a reply's code, enhanced code and text as the server sent them", () => {
    expect(replyFromLine("552 5.2.2 <full@example.test> Quota exceeded (mailbox for user is full)")).toEqual({
      code: 552,
      enhanced: "5.2.2",
      text: "<full@example.test> Quota exceeded (mailbox for user is full)",
    });
    expect(replyFromLine("451 try again")).toEqual({ code: 451, enhanced: "4.0.0", text: "try again" });
  });
});

describe("delivery over LMTP to Dovecot", () => {
  it("delivers each copy with Return-Path and Delivered-To, over TCP and a unix socket, +tag to its folder", async () => {
    for (const url of [dovecot.lmtpUrl, dovecot.lmtpSocketUrl]) {
      const h = await harness({ url });
      const subject = `hello over ${url.split(":")[0]}`;
      await send(`From: s@remote.test\r\nSubject: ${subject}\r\n\r\ncafé\r\n.leading dot\r\n`, [
        rcpt("postmaster@example.test", "alice@example.test"),
        rcpt("bob+news@example.test", "bob@example.test", "news"),
      ]);
      await waitFor(() => h.statuses.length >= 2, { message: "two statuses", timeoutMs: 20_000 });
      for (const s of h.statuses) {
        expect(s.outcome).toBe("delivered");
        expect(s.service).toBe("mda");
        // Dovecot's own reply, e.g. `250 2.0.0 <alice@example.test> <session id> Saved`
        expect(s.reply.code).toBe(250);
        expect(s.reply.enhanced).toBe("2.0.0");
        expect(s.reply.text).toMatch(/^<(alice|bob\+news)@example\.test> \S+ Saved$/);
      }
      const inbox = (await imap("alice@example.test")).filter((m) => m.raw.includes(subject));
      expect(inbox).toHaveLength(1);
      const raw = inbox[0]!.raw;
      expect(raw.startsWith("Return-Path: <sender@remote.test>\r\n")).toBe(true);
      expect(raw).toContain("\r\nDelivered-To: postmaster@example.test\r\n");
      expect(raw).toContain("\r\n\r\ncafé\r\n.leading dot\r\n");
      const news = (await imap("bob@example.test", "news")).filter((m) => m.raw.includes(subject));
      expect(news).toHaveLength(1);
      expect(news[0]!.raw).toContain("\r\nDelivered-To: bob+news@example.test\r\n");
      expect((await imap("bob@example.test")).filter((m) => m.raw.includes(subject))).toEqual([]);
      for (const c of cleanups.splice(0).reverse()) await c();
      await router.jsm.consumers.delete("MAIL_STATUS", "test-status").catch(() => {});
    }
  }, 60_000);

  it('runs the user\'s Sieve script: fileinto "Lists" files a matching message there', async () => {
    const h = await harness();
    await send(
      "From: news@announce.example.org\r\nList-Id: <x.announce.example.org>\r\nSubject: issue 1\r\n\r\nhi\r\n",
      [rcpt("lists@example.test")],
    );
    await send("From: friend@remote.test\r\nSubject: personal\r\n\r\nhi\r\n", [rcpt("lists@example.test")]);
    await waitFor(() => h.statuses.length >= 2, { message: "two statuses", timeoutMs: 20_000 });
    expect(h.statuses.map((s) => s.outcome)).toEqual(["delivered", "delivered"]);
    const lists = await imap("lists@example.test", "Lists");
    expect(lists.map((m) => /Subject: (.*)\r\n/.exec(m.raw)?.[1])).toEqual(["issue 1"]);
    const inbox = await imap("lists@example.test");
    expect(inbox.map((m) => /Subject: (.*)\r\n/.exec(m.raw)?.[1])).toEqual(["personal"]);
  }, 30_000);

  it("Sieve reject: Dovecot takes the copy, files nothing, and sends the sender a rejection", async () => {
    const h = await harness();
    const before = submission.messages.length;
    await send(
      "From: shop@remote.test\r\nSubject: buy now\r\nMessage-ID: <offer-1@remote.test>\r\n\r\noffer\r\n",
      [rcpt("picky@example.test")],
      "shop@remote.test",
    );
    await waitFor(() => h.statuses.length >= 1, { message: "a status", timeoutMs: 20_000 });
    expect(h.statuses[0]!.outcome).toBe("delivered");
    const [bounce] = await submission.waitForMessages(before + 1, 20_000).then((m) => m.slice(before));
    // a rejection goes from the null sender to the envelope sender (RFC 5429), with the reason
    expect(bounce!.mailFrom).toBe("");
    expect(bounce!.rcptTo).toEqual(["shop@remote.test"]);
    const text = bounce!.raw.toString();
    expect(text).toMatch(/^To: <?shop@remote\.test>?\r?$/m);
    expect(text).toContain("I do not accept offers.");
    expect(text).toMatch(/Subject: Rejected: buy now/);
    expect(await imap("picky@example.test")).toEqual([]);
  }, 30_000);

  it("a full mailbox: 552 5.2.2 bounces, 452 4.2.2 defers, each with Dovecot's words", async () => {
    const h = await harness();
    const big = `From: s@remote.test\r\nSubject: big\r\n\r\n${"x".repeat(4000)}\r\n`;
    await send(big, [rcpt("full@example.test"), rcpt("busy@example.test"), rcpt("nobody@example.test")]);
    await waitFor(() => h.statuses.length >= 3, { message: "three statuses", timeoutMs: 20_000 });
    const by = new Map(h.statuses.map((s) => [s.recipient, s]));
    expect(by.get("full@example.test")).toMatchObject({
      outcome: "bounced",
      reply: {
        code: 552,
        enhanced: "5.2.2",
        text: "<full@example.test> Quota exceeded (mailbox for user is full)",
      },
    });
    expect(by.get("busy@example.test")).toMatchObject({
      outcome: "deferred",
      reply: {
        code: 452,
        enhanced: "4.2.2",
        text: "<busy@example.test> Quota exceeded (mailbox for user is full)",
      },
    });
    expect(by.get("nobody@example.test")).toMatchObject({
      outcome: "bounced",
      reply: { code: 550, enhanced: "5.1.1" },
    });
    expect(await imap("full@example.test")).toEqual([]);
  }, 30_000);

  it("a copy Dovecot accepted is not delivered again when the request comes back (status lost)", async () => {
    const h = await harness({ failFirstPublish: true });
    const req = await send("From: s@remote.test\r\nSubject: exactly once\r\n\r\nonce\r\n", [
      rcpt("idem@example.test"),
    ]);
    // the first attempt delivers, records the marker, then "dies" before the status: the request
    // is nakked and comes back; the second attempt finds the marker and only reports
    await waitFor(() => h.statuses.length >= 1, {
      message: "the status of the second attempt",
      timeoutMs: 20_000,
    });
    expect(h.statuses[0]).toMatchObject({ outcome: "delivered", reply: { code: 250, enhanced: "2.0.0" } });
    expect(h.statuses[0]!.reply.text).toMatch(/^<idem@example\.test> \S+ Saved$/);
    expect(await redis.get(doneKey(req.queueId, "idem@example.test"))).toMatch(/^lmtp 250 2\.0\.0 /);
    await waitFor(
      async () => {
        const info = await router.jsm.consumers.info("MAIL_DELIVER", "mda");
        return info.num_ack_pending === 0 && info.num_pending === 0;
      },
      { message: "request acked" },
    );
    const inbox = await imap("idem@example.test");
    expect(inbox.filter((m) => m.raw.includes("exactly once"))).toHaveLength(1);
  }, 30_000);

  it("reuses its connections: twelve requests over a pool of two", async () => {
    const connects = async () =>
      ((await dovecot.log()).match(/lmtp\(\d+\): Info: Connect from/g) ?? []).length;
    const before = await connects();
    const h = await harness({ poolSize: 2 });
    for (let i = 0; i < 12; i++) await send(`Subject: pooled ${i}\r\n\r\nx\r\n`, [rcpt("pool@example.test")]);
    await waitFor(() => h.statuses.length >= 12, { message: "twelve statuses", timeoutMs: 30_000 });
    expect(h.statuses.every((s) => s.outcome === "delivered")).toBe(true);
    expect(await imap("pool@example.test")).toHaveLength(12);
    const opened = (await connects()) - before;
    expect(opened).toBeGreaterThanOrEqual(1);
    expect(opened).toBeLessThanOrEqual(2);
  }, 40_000);

  it("defers with 451 4.4.1 when the LMTP server cannot be reached", async () => {
    const h = await harness({ url: "unix:/nonexistent/dovecot/lmtp" });
    await send("Subject: nowhere\r\n\r\nx\r\n", [rcpt("alice@example.test")]);
    await waitFor(() => h.statuses.length >= 1, { message: "a status", timeoutMs: 20_000 });
    expect(h.statuses[0]).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.4.1" } });
    expect(h.statuses[0]!.reply.text).toContain("unix:/nonexistent/dovecot/lmtp");
  }, 30_000);
});
