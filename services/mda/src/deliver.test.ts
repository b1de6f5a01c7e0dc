import { spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rename, utimes, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Writable } from "node:stream";
import { type BodyStore, Bus, type Subscription } from "@mailpipe/bus";
import {
  type BodyRef,
  decodeJson,
  LocalDeliveryRequest,
  MailEvent,
  newQueueId,
  RecipientStatus,
  subjects,
  topology,
} from "@mailpipe/contracts";
import { type DirectoryWatcher, watchDirectory } from "@mailpipe/directory";
import { attr, createTelemetry, InMemorySpanExporter, type Telemetry } from "@mailpipe/telemetry";
import {
  freePort,
  type NatsHandle,
  type ServerHandle,
  startNats,
  startRedis,
  type TempDir,
  tempDir,
  waitFor,
} from "@mailpipe/testing";
import { AckPolicy } from "@nats-io/jetstream";
import { Redis } from "ioredis";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { createDeliverer, doneKey, replyForError } from "./deliver.ts";
import { deliveryHeader, messageName } from "./maildir.ts";

let nats: NatsHandle;
let redisServer: ServerHandle;
let redis: Redis;
let router: Bus; // plays the router: publishes requests, reads statuses and events
let bodies: BodyStore;

function quiet(service: "router" | "mda", extra: Partial<Parameters<typeof createTelemetry>[0]> = {}) {
  return createTelemetry({
    service,
    logDestination: new Writable({ write: (_c, _e, cb) => cb() }),
    defaultMetrics: false,
    ...extra,
  });
}

beforeAll(async () => {
  [nats, redisServer] = await Promise.all([startNats(), startRedis()]);
  redis = new Redis(redisServer.url);
  router = await Bus.connect({ url: nats.url, name: "test-router", telemetry: quiet("router") });
  await router.ensureTopology();
  bodies = await router.bodies();
});

afterAll(async () => {
  await router?.close();
  redis?.disconnect();
  await Promise.all([nats?.stop(), redisServer?.stop()]);
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

const DIRECTORY = (carolQuota: string) => `
domains:
  example.test:
  example.net:
    spamToJunk: false
users:
  dave@example.net: {}
  alice@example.test: {}
  bob@example.test: {}
  carol@example.test:
    quota: ${carolQuota}
`;

interface Harness {
  root: string;
  watcher: DirectoryWatcher;
  directoryFile: string;
  spans: InMemorySpanExporter;
  logs: Record<string, unknown>[];
  telemetry: Telemetry;
  statuses: RecipientStatus[];
  events: MailEvent[];
  bodyCalls: { read: number; readBuffer: number };
  sub: Subscription;
}

/** The mda handler on its own Bus connection, consuming "mda" as the service does. */
async function harness(
  opts: {
    root?: string;
    carolQuota?: string;
    ackWaitMs?: number;
    redis?: Redis;
    maxAutoFolders?: number;
  } = {},
): Promise<Harness> {
  const tmp: TempDir = await tempDir("mda-deliver");
  cleanups.push(() => tmp.remove());
  const root = opts.root ?? join(tmp.path, "mail");
  const directoryFile = join(tmp.path, "directory.yaml");
  await writeFile(directoryFile, DIRECTORY(opts.carolQuota ?? "1K"));
  const watcher = await watchDirectory(directoryFile, { fsWatch: false });
  cleanups.push(() => watcher.close());

  const spans = new InMemorySpanExporter();
  const logs: Record<string, unknown>[] = [];
  const telemetry = quiet("mda", {
    spanExporter: spans,
    logDestination: new Writable({
      write(chunk, _e, cb) {
        for (const l of String(chunk).split("\n")) if (l) logs.push(JSON.parse(l));
        cb();
      },
    }),
  });
  const mda = await Bus.connect({ url: nats.url, name: "test-mda", telemetry });
  cleanups.push(() => mda.close());
  const store = await mda.bodies();
  const bodyCalls = { read: 0, readBuffer: 0 };
  const deliverer = createDeliverer({
    maildirRoot: root,
    hostname: "mda.example.test",
    fsync: true,
    ackWaitMs: opts.ackWaitMs ?? 10_000,
    bus: mda,
    bodies: {
      read: (ref) => {
        bodyCalls.read++;
        return store.read(ref);
      },
      // counts reads from the store; a body the request carried is only checked
      readBuffer: (ref, attachment) => {
        if (!attachment) bodyCalls.readBuffer++;
        return store.readBuffer(ref, attachment);
      },
    },
    redis: opts.redis ?? redis,
    directory: () => watcher.current(),
    telemetry,
    ...(opts.maxAutoFolders !== undefined ? { maxAutoFolders: opts.maxAutoFolders } : {}),
  });
  const sub = await mda.consume("mda", LocalDeliveryRequest, deliverer.handle, {
    maxInFlight: 8,
    ackWaitMs: opts.ackWaitMs ?? 10_000,
  });

  const statuses: RecipientStatus[] = [];
  await router.jsm.consumers.add("MAIL_STATUS", {
    durable_name: "test-status",
    ack_policy: AckPolicy.Explicit,
    filter_subject: subjects.statusAll(),
  });
  const statusMsgs = await (await router.js.consumers.get("MAIL_STATUS", "test-status")).consume();
  void (async () => {
    for await (const m of statusMsgs) {
      statuses.push(decodeJson(RecipientStatus, m.data));
      m.ack();
    }
  })();
  cleanups.push(() => statusMsgs.close());

  const events: MailEvent[] = [];
  const eventSub = router.nc.subscribe(subjects.eventsAll(), {
    callback: (_err, m) => {
      events.push(decodeJson(MailEvent, m.data));
    },
  });
  cleanups.push(() => eventSub.unsubscribe());
  await router.nc.flush();

  return { root, watcher, directoryFile, spans, logs, telemetry, statuses, events, bodyCalls, sub };
}

async function storeBody(bytes: Buffer): Promise<BodyRef> {
  return bodies.put(newQueueId(), bytes);
}

function request(
  body: BodyRef,
  recipients: LocalDeliveryRequest["recipients"],
  opts: { queueId?: string; dispatch?: number; mailFrom?: string } = {},
): LocalDeliveryRequest {
  const queueId = opts.queueId ?? newQueueId();
  return {
    v: 1,
    queueId,
    dispatchId: `${queueId}.local.${opts.dispatch ?? 1}`,
    receivedAt: new Date().toISOString(),
    mailFrom: opts.mailFrom ?? "sender@remote.test",
    recipients,
    body,
  };
}

async function send(req: LocalDeliveryRequest, msgId = req.dispatchId, attachment?: Buffer): Promise<void> {
  await router.publish(subjects.deliverLocal(), LocalDeliveryRequest, req, {
    msgId,
    ...(attachment ? { attachment } : {}),
  });
}

async function files(dir: string): Promise<string[]> {
  return existsSync(dir) ? readdir(dir) : [];
}

/** Every file under `root` whose parent is named `name` (new, tmp, cur). */
async function allIn(root: string, name: string): Promise<string[]> {
  if (!existsSync(root)) return [];
  const entries = await readdir(root, { recursive: true, withFileTypes: true });
  return entries.filter((e) => e.isFile() && e.parentPath.endsWith(`/${name}`)).map((e) => e.name);
}

const header = (mailFrom: string, to: string) =>
  Buffer.from(`Return-Path: <${mailFrom}>\r\nDelivered-To: ${to}\r\n`);

async function consumerSettled(): Promise<boolean> {
  const info = await router.jsm.consumers.info("MAIL_DELIVER", "mda");
  return info.num_ack_pending === 0 && info.num_pending === 0;
}

describe("local delivery", () => {
  it("writes each recipient's copy into its Maildir (and +tag folder), byte-exact, and reports delivered", async () => {
    const h = await harness();
    // 8-bit bytes, bare LF, bare CR, no final newline: all must arrive untouched
    const body = Buffer.concat([
      Buffer.from("From: s@remote.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\nline\nbare CR\r"),
      Buffer.from([0xc3, 0xa9, 0x00, 0xff]),
      Buffer.from("\r\n.\r\nend"),
    ]);
    const ref = await storeBody(body);
    const req = request(ref, [
      { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
      { mailbox: "bob@example.test", address: "bob+news@example.test", folder: "news", attempt: 3 },
    ]);
    await send(req);
    await waitFor(() => h.statuses.length >= 2, { message: "two statuses" });

    const alice = join(h.root, "example.test/alice/Maildir");
    const bobNews = join(h.root, "example.test/bob/Maildir/.news");
    const [aliceFile] = await files(join(alice, "new"));
    const [bobFile] = await files(join(bobNews, "new"));
    expect(await files(join(alice, "new"))).toHaveLength(1);
    expect(await files(join(bobNews, "new"))).toHaveLength(1);
    expect(await files(join(h.root, "example.test/bob/Maildir/new"))).toEqual([]);
    const aliceBytes = await readFile(join(alice, "new", aliceFile!));
    const bobBytes = await readFile(join(bobNews, "new", bobFile!));
    expect(aliceBytes.equals(Buffer.concat([header("sender@remote.test", "alice@example.test"), body]))).toBe(
      true,
    );
    expect(
      bobBytes.equals(Buffer.concat([header("sender@remote.test", "bob+news@example.test"), body])),
    ).toBe(true);
    expect(aliceFile).toMatch(
      new RegExp(`^\\d+\\.Q${req.queueId}R[0-9a-f]{10}\\.mda\\.example\\.test,S=\\d+$`),
    );
    expect(aliceFile).toContain(`,S=${aliceBytes.length}`);
    expect(await readFile(join(h.root, "example.test/bob/Maildir/subscriptions"), "utf8")).toBe("news\n");
    expect(await allIn(h.root, "tmp")).toEqual([]);

    const byRcpt = Object.fromEntries(h.statuses.map((s) => [s.recipient, s]));
    expect(byRcpt["alice@example.test"]).toMatchObject({
      queueId: req.queueId,
      dispatchId: req.dispatchId,
      outcome: "delivered",
      attempt: 1,
      service: "mda",
      remoteMta: "mda.example.test",
      reply: { code: 250, enhanced: "2.0.0" },
    });
    expect(byRcpt["bob+news@example.test"]).toMatchObject({ outcome: "delivered", attempt: 3 });
    await waitFor(consumerSettled, { message: "request acked" });
    await waitFor(() => h.events.filter((e) => e.type === "delivered").length === 2);
    expect(h.events[0]).toMatchObject({ service: "mda", queueId: req.queueId });

    // a child span per copy with the domain, never the local part
    const writes = h.spans.getFinishedSpans().filter((s) => s.name === "maildir.write");
    expect(writes).toHaveLength(2);
    for (const s of writes) {
      expect(s.attributes).toMatchObject({
        [attr.queueId]: req.queueId,
        [attr.recipientDomain]: "example.test",
        [attr.outcome]: "delivered",
        [attr.replyCode]: 250,
      });
      expect(JSON.stringify(s.attributes)).not.toMatch(/alice|bob/);
      expect(s.parentSpanContext?.spanId).toBeDefined();
    }
    // one info line per copy, with the queue id and the path relative to the root
    const delivered = h.logs.filter((l) => l.msg === "delivered");
    expect(delivered).toHaveLength(2);
    expect(delivered.find((l) => l.recipient === "alice@example.test")).toMatchObject({
      queueId: req.queueId,
      path: `example.test/alice/Maildir/new/${aliceFile}`,
    });
    const metrics = await h.telemetry.metrics.text();
    expect(metrics).toMatch(/mailpipe_mda_deliveries_total\{outcome="delivered",service="mda"\} 2/);
    expect(metrics).toContain(
      `mailpipe_mda_bytes_written_total{service="mda"} ${aliceBytes.length + bobBytes.length}`,
    );
    expect(metrics).toMatch(/mailpipe_mda_write_seconds_count\{service="mda"\} 2/);
    // small bodies are read once per request, not per recipient
    expect(h.bodyCalls).toEqual({ read: 0, readBuffer: 1 });
  });

  it("writes a body the request carried without reading the store, and defers one that does not match", async () => {
    const h = await harness();
    const body = Buffer.from("From: s@remote.test\r\nSubject: carried\r\n\r\nsmall body\r\n");
    const sha256 = createHash("sha256").update(body).digest("hex");
    // the router's reference names a spool message this test never wrote: only the attachment has the bytes
    const ref = { stream: "MAIL_SPOOL", seq: 999_999, size: body.length, sha256 };
    const good = request(ref, [{ mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 }]);
    await send(good, good.dispatchId, body);
    const forged = request(ref, [{ mailbox: "bob@example.test", address: "bob@example.test", attempt: 1 }]);
    await send(forged, forged.dispatchId, Buffer.from("From: s@remote.test\r\n\r\nsomething else\r\n"));
    await waitFor(() => h.statuses.length >= 2, { message: "two statuses" });

    const alice = join(h.root, "example.test/alice/Maildir/new");
    const [file] = await files(alice);
    expect(
      (await readFile(join(alice, file!))).equals(
        Buffer.concat([header("sender@remote.test", "alice@example.test"), body]),
      ),
    ).toBe(true);
    expect(h.statuses.find((s) => s.queueId === good.queueId)).toMatchObject({ outcome: "delivered" });
    expect(h.statuses.find((s) => s.queueId === forged.queueId)).toMatchObject({
      outcome: "deferred",
      reply: { code: 451, enhanced: "4.3.0" },
    });
    expect(await allIn(join(h.root, "example.test/bob"), "new")).toEqual([]);
    expect(h.bodyCalls).toEqual({ read: 0, readBuffer: 0 });
  });

  it("delivers +tags to INBOX (Delivered-To still the plus address) for special-use names and past MDA_MAX_AUTO_FOLDERS", async () => {
    const h = await harness({ maxAutoFolders: 1 });
    const ref = await storeBody(Buffer.from("Subject: tagged\r\n\r\nx\r\n"));
    const req = request(ref, [
      { mailbox: "bob@example.test", address: "bob+Trash@example.test", folder: "Trash", attempt: 1 },
      { mailbox: "bob@example.test", address: "bob+news@example.test", folder: "news", attempt: 1 },
      { mailbox: "bob@example.test", address: "bob+lists@example.test", folder: "lists", attempt: 1 },
    ]);
    await send(req);
    await waitFor(() => h.statuses.length >= 3, { message: "three statuses" });
    expect(h.statuses.map((s) => s.outcome)).toEqual(["delivered", "delivered", "delivered"]);

    const maildir = join(h.root, "example.test/bob/Maildir");
    // news was the one folder allowed; Trash is never created, lists is over the limit
    expect((await readdir(maildir)).filter((n) => n.startsWith("."))).toEqual([".news"]);
    expect(await files(join(maildir, ".news/new"))).toHaveLength(1);
    const inbox = await files(join(maildir, "new"));
    expect(inbox).toHaveLength(2);
    const deliveredTo = await Promise.all(
      inbox.map(
        async (n) => /Delivered-To: (\S+)\r\n/.exec(await readFile(join(maildir, "new", n), "utf8"))?.[1],
      ),
    );
    expect(deliveredTo.sort()).toEqual(["bob+Trash@example.test", "bob+lists@example.test"]);
    expect(await readFile(join(maildir, "subscriptions"), "utf8")).toBe("news\n");
    expect(
      h.logs.filter((l) => l.msg === "delivered" && l.tagFolder).map((l) => [l.recipient, l.tagFolder]),
    ).toEqual([
      ["bob+Trash@example.test", "Trash"],
      ["bob+lists@example.test", "lists"],
    ]);
  });

  it("writes <> as the Return-Path of a bounce", async () => {
    const h = await harness();
    const ref = await storeBody(Buffer.from("Subject: bounce\r\n\r\nx\r\n"));
    await send(
      request(ref, [{ mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 }], {
        mailFrom: "",
      }),
    );
    await waitFor(() => h.statuses.length === 1);
    const dir = join(h.root, "example.test/alice/Maildir/new");
    const [name] = await files(dir);
    expect(
      (await readFile(join(dir, name!), "utf8")).startsWith(
        "Return-Path: <>\r\nDelivered-To: alice@example.test\r\n",
      ),
    ).toBe(true);
  });

  it("files a message the spam filter marked into Junk, unless the domain turned spamToJunk off", async () => {
    const h = await harness();
    const spam = Buffer.from("From: s@remote.test\r\nX-Spam: Yes\r\nSubject: cheap\r\n\r\nbuy\r\n");
    const ham = Buffer.from("From: s@remote.test\r\nX-Spam: No\r\nSubject: hi\r\n\r\nX-Spam: Yes\r\n");
    await send(
      request(await storeBody(spam), [
        { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
        // spam wins over a +tag folder
        { mailbox: "bob@example.test", address: "bob+news@example.test", folder: "news", attempt: 1 },
        // example.net has spamToJunk: false
        { mailbox: "dave@example.net", address: "dave@example.net", attempt: 1 },
      ]),
    );
    await send(
      request(await storeBody(ham), [
        { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
      ]),
    );
    await waitFor(() => h.statuses.length === 4);
    expect(h.statuses.every((s) => s.outcome === "delivered")).toBe(true);
    const junk = join(h.root, "example.test/alice/Maildir/.Junk");
    expect(await files(join(junk, "new"))).toHaveLength(1);
    expect(existsSync(join(junk, "maildirfolder"))).toBe(true);
    expect(await readFile(join(h.root, "example.test/alice/Maildir/subscriptions"), "utf8")).toContain(
      "Junk",
    );
    const [inboxCopy] = await files(join(h.root, "example.test/alice/Maildir/new"));
    expect(await readFile(join(h.root, "example.test/alice/Maildir/new", inboxCopy!), "utf8")).toContain(
      "Subject: hi",
    );
    expect(await files(join(h.root, "example.test/alice/Maildir/new"))).toHaveLength(1);
    expect(await files(join(h.root, "example.test/bob/Maildir/.Junk/new"))).toHaveLength(1);
    expect(await files(join(h.root, "example.test/bob/Maildir/.news/new"))).toEqual([]);
    expect(await files(join(h.root, "example.net/dave/Maildir/new"))).toHaveLength(1);
    expect(existsSync(join(h.root, "example.net/dave/Maildir/.Junk"))).toBe(false);
  });

  it("never writes a second copy of a redelivered request, and reports delivered again", async () => {
    const h = await harness();
    const ref = await storeBody(Buffer.from("Subject: once\r\n\r\nonly once\r\n"));
    const req = request(ref, [
      { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
      { mailbox: "bob@example.test", address: "bob+news@example.test", folder: "news", attempt: 1 },
    ]);
    const aliceNew = join(h.root, "example.test/alice/Maildir/new");
    const bobNew = join(h.root, "example.test/bob/Maildir/.news/new");
    const deliveredEvents = () => h.events.filter((e) => e.type === "delivered").length;

    await send(req);
    await waitFor(() => deliveredEvents() === 2);
    // JetStream redelivers the same request (another msg id, as the stream would not store a repeat)
    await send(req, `${req.dispatchId}#redelivery`);
    await waitFor(() => deliveredEvents() === 4, { message: "delivered reported again" });
    expect(await files(aliceNew)).toHaveLength(1);
    expect(await files(bobNew)).toHaveLength(1);
    expect(h.logs.filter((l) => l.msg === "delivered")).toHaveLength(2);

    // Dovecot moved alice's copy to cur/: the Redis marker still knows it was delivered
    const [name] = await files(aliceNew);
    await rename(join(aliceNew, name!), join(aliceNew, "..", "cur", `${name}:2,S`));
    await send(req, `${req.dispatchId}#again`);
    await waitFor(() => deliveredEvents() === 6);
    expect(await files(aliceNew)).toEqual([]);

    // a crash between the rename and the marker: the file in new/ is found, and the marker set then
    await redis.del(doneKey(req.queueId, "bob+news@example.test"));
    const again = request(
      ref,
      [{ mailbox: "bob@example.test", address: "bob+news@example.test", folder: "news", attempt: 2 }],
      {
        queueId: req.queueId,
        dispatch: 2,
      },
    );
    await send(again);
    await waitFor(() => h.statuses.some((s) => s.dispatchId === again.dispatchId), {
      message: "re-dispatch status",
    });
    expect(h.statuses.find((s) => s.dispatchId === again.dispatchId)).toMatchObject({
      outcome: "delivered",
      attempt: 2,
    });
    expect(await files(bobNew)).toHaveLength(1);
    expect(await redis.exists(doneKey(req.queueId, "bob+news@example.test"))).toBe(1);
    expect(await allIn(h.root, "tmp")).toEqual([]);
  });

  it("leaves a copy another worker is writing alone, and takes it over once that worker is gone", async () => {
    const h = await harness({ ackWaitMs: 4000 }); // a tmp file older than 2 s is stale
    const body = Buffer.from("Subject: contested\r\n\r\nx\r\n");
    const ref = await storeBody(body);
    const req = request(ref, [{ mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 }]);
    const size = deliveryHeader(req.mailFrom, "alice@example.test").length + body.length;
    const tmp = join(h.root, "example.test/alice/Maildir/tmp");
    const name = messageName(req.queueId, "alice@example.test", "mda.example.test", size);
    await mkdir(tmp, { recursive: true });
    await writeFile(join(tmp, name), "half written by a live worker");

    await send(req);
    await waitFor(() =>
      h.logs.some((l) => l.msg === "another worker is writing this copy; will retry the request"),
    );
    expect(h.statuses).toEqual([]); // nothing reported while the other worker may still finish
    expect(await readFile(join(tmp, name), "utf8")).toBe("half written by a live worker");

    // that worker died: its file stops changing and grows old; the retried request takes over
    const old = new Date(Date.now() - 60_000);
    await utimes(join(tmp, name), old, old);
    await waitFor(() => h.statuses.length === 1, { timeoutMs: 15_000, message: "delivered after the retry" });
    expect(h.statuses[0]).toMatchObject({ outcome: "delivered", attempt: 1 });
    const dir = join(h.root, "example.test/alice/Maildir/new");
    expect(await files(dir)).toEqual([name]);
    expect((await readFile(join(dir, name))).toString()).toMatch(/\r\nx\r\n$/);
    expect(await files(tmp)).toEqual([]);
  });

  it("keeps delivering while Redis is down, still refusing to write a copy twice", async () => {
    const down = new Redis({
      port: await freePort(),
      lazyConnect: true,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
    });
    down.on("error", () => {});
    cleanups.push(() => down.disconnect());
    const h = await harness({ redis: down });
    const req = request(await storeBody(Buffer.from("x\r\n")), [
      { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
    ]);
    await send(req);
    await send(req, `${req.dispatchId}#redelivery`);
    await waitFor(() => h.events.filter((e) => e.type === "delivered").length === 2);
    expect(await files(join(h.root, "example.test/alice/Maildir/new"))).toHaveLength(1);
    expect(h.logs.some((l) => l.level === "warn" && String(l.msg).startsWith("Redis unavailable"))).toBe(
      true,
    );
  });

  it("defers an over-quota copy with 452 4.2.2, writes nothing, and follows a quota change without a restart", async () => {
    const h = await harness({ carolQuota: "1K" });
    const ref = await storeBody(randomBytes(2048));
    const first = request(ref, [
      { mailbox: "carol@example.test", address: "carol@example.test", attempt: 1 },
    ]);
    await send(first);
    await waitFor(() => h.statuses.length === 1);
    expect(h.statuses[0]).toMatchObject({
      outcome: "deferred",
      recipient: "carol@example.test",
      reply: { code: 452, enhanced: "4.2.2" },
    });
    expect(h.statuses[0]!.reply.text).toContain("carol@example.test");
    const carol = join(h.root, "example.test/carol/Maildir");
    expect(await allIn(carol, "new")).toEqual([]);
    expect(await allIn(carol, "tmp")).toEqual([]);
    await waitFor(consumerSettled, { message: "deferred request acked (router reschedules)" });

    await writeFile(h.directoryFile, DIRECTORY("1M"));
    await h.watcher.reload();
    const retry = request(
      ref,
      [{ mailbox: "carol@example.test", address: "carol@example.test", attempt: 2 }],
      {
        queueId: first.queueId,
        dispatch: 2,
      },
    );
    await send(retry);
    await waitFor(() => h.statuses.length === 2);
    expect(h.statuses[1]).toMatchObject({ outcome: "delivered", attempt: 2 });
    expect(await allIn(carol, "new")).toHaveLength(1);
  });

  it("counts mail already in the mailbox (and its folders) against the quota", async () => {
    const h = await harness({ carolQuota: "10K" });
    const carol = join(h.root, "example.test/carol/Maildir");
    await mkdir(join(carol, ".old", "cur"), { recursive: true });
    await writeFile(join(carol, ".old", "cur", "1.Qx.host,S=9500:2,S"), "x");
    const ref = await storeBody(randomBytes(1000));
    await send(request(ref, [{ mailbox: "carol@example.test", address: "carol@example.test", attempt: 1 }]));
    await waitFor(() => h.statuses.length === 1);
    expect(h.statuses[0]).toMatchObject({ outcome: "deferred", reply: { code: 452, enhanced: "4.2.2" } });
  });

  it.each([
    ["buffered", 2048],
    ["streamed", 2 * 1024 * 1024],
  ])("defers a %s body whose sha256 does not match with 451 4.3.0, leaving no file", async (_kind, size) => {
    const h = await harness();
    const ref = await storeBody(randomBytes(size));
    const bad = { ...ref, sha256: createHash("sha256").update("something else").digest("hex") };
    await send(
      request(bad, [
        { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
        { mailbox: "bob@example.test", address: "bob@example.test", attempt: 1 },
      ]),
    );
    await waitFor(() => h.statuses.length === 2);
    for (const s of h.statuses)
      expect(s).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.3.0" } });
    expect(await allIn(h.root, "new")).toEqual([]);
    expect(await allIn(h.root, "tmp")).toEqual([]);
    expect(h.logs.some((l) => l.level === "error" && l.msg === "message body unusable; deferring")).toBe(
      true,
    );
    const metrics = await h.telemetry.metrics.text();
    expect(metrics).toMatch(/mailpipe_mda_deliveries_total\{outcome="deferred",service="mda"\} 2/);
  });

  it("defers with 451 4.3.0 when the body is gone", async () => {
    const h = await harness();
    const missing = { bucket: "mail-bodies", key: newQueueId(), size: 10, sha256: "0".repeat(64) };
    await send(
      request(missing, [{ mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 }]),
    );
    await waitFor(() => h.statuses.length === 1);
    expect(h.statuses[0]).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.3.0" } });
  });

  it("streams a 30 MB body to disk byte-exact without reading it into memory", async () => {
    const h = await harness();
    const body = randomBytes(30 * 1024 * 1024);
    const ref = await storeBody(body);
    await send(
      request(ref, [
        { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
        { mailbox: "bob@example.test", address: "bob@example.test", attempt: 1 },
      ]),
    );
    await waitFor(() => h.statuses.length === 2, { timeoutMs: 60_000 });
    expect(h.statuses.map((s) => s.outcome)).toEqual(["delivered", "delivered"]);
    const dir = join(h.root, "example.test/alice/Maildir/new");
    const [name] = await files(dir);
    const written = await readFile(join(dir, name!));
    const expected = createHash("sha256")
      .update(header("sender@remote.test", "alice@example.test"))
      .update(body)
      .digest("hex");
    expect(createHash("sha256").update(written).digest("hex")).toBe(expected);
    // streamed, once per recipient, plus the first 64 KiB once for the spamToJunk rule
    expect(h.bodyCalls).toEqual({ read: 3, readBuffer: 0 });
  }, 120_000);

  it("defers with 451 4.3.0 on a filesystem error, logging the path but keeping it out of the reply", async () => {
    const h = await harness();
    const maildir = join(h.root, "example.test/alice/Maildir");
    await mkdir(maildir, { recursive: true });
    await writeFile(join(maildir, "tmp"), "a file where a directory should be");
    await send(
      request(await storeBody(Buffer.from("x\r\n")), [
        { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
      ]),
    );
    await waitFor(() => h.statuses.length === 1);
    expect(h.statuses[0]).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.3.0" } });
    expect(JSON.stringify(h.statuses[0]!.reply)).not.toContain(h.root);
    const line = h.logs.find((l) => l.msg === "Maildir write failed; deferring") as {
      err: Record<string, unknown>;
    };
    expect(line.err.path).toContain(maildir);
    expect(line.err.code).toMatch(/^E[A-Z]+$/);
    expect(JSON.stringify(line)).not.toContain("    at ");
  });
});

describe("a full disk", () => {
  it("maps ENOSPC and EDQUOT to 452 4.3.1 and other errors to 451 4.3.0", () => {
    expect(replyForError(Object.assign(new Error("x"), { code: "ENOSPC" }))).toMatchObject({
      code: 452,
      enhanced: "4.3.1",
    });
    expect(replyForError(Object.assign(new Error("x"), { code: "EDQUOT" }))).toMatchObject({
      code: 452,
      enhanced: "4.3.1",
    });
    expect(replyForError(Object.assign(new Error("x"), { code: "EACCES" }))).toMatchObject({
      code: 451,
      enhanced: "4.3.0",
    });
    expect(replyForError(new Error("anything"))).toMatchObject({ code: 451, enhanced: "4.3.0" });
  });

  // A real ENOSPC needs a tiny file system; mounting one needs root (CAP_SYS_ADMIN), as in CI's container.
  const mountPoint = join("/tmp", `mda-full-${process.pid}`);
  const mount = () =>
    spawnSync("sh", ["-c", `mkdir -p ${mountPoint} && mount -t tmpfs -o size=256k tmpfs ${mountPoint}`])
      .status === 0;
  const unmount = () => spawnSync("sh", ["-c", `umount ${mountPoint} 2>/dev/null; rmdir ${mountPoint}`]);
  // probe now (test collection), mount for real only inside the test
  const canMount = process.getuid?.() === 0 && mount();
  if (canMount) unmount();

  it.runIf(canMount)("defers with 452 4.3.1 when the disk is full, leaving no partial file", async () => {
    expect(mount()).toBe(true);
    cleanups.push(unmount);
    const h = await harness({ root: join(mountPoint, "mail") });
    await send(
      request(await storeBody(randomBytes(512 * 1024)), [
        { mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 },
      ]),
    );
    await waitFor(() => h.statuses.length === 1);
    expect(h.statuses[0]).toMatchObject({
      outcome: "deferred",
      reply: { code: 452, enhanced: "4.3.1", text: "Insufficient system storage" },
    });
    expect(await allIn(h.root, "new")).toEqual([]);
    expect(await allIn(h.root, "tmp")).toEqual([]);
  });
});
