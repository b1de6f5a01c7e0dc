// SIGTERM while a request is being written: the service finishes it, acks it, and exits 0.
import { createHash, randomBytes } from "node:crypto";
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Bus } from "@mailpipe/bus";
import { decodeJson, LocalDeliveryRequest, newQueueId, RecipientStatus, subjects } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import { startNats, startRedis, startService, tempDir, waitFor } from "@mailpipe/testing";
import { AckPolicy } from "@nats-io/jetstream";
import { afterEach, expect, it } from "vitest";

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await Promise.resolve(c()).catch(() => {});
});

const list = (dir: string) => readdir(dir).catch(() => [] as string[]);

it("finishes the copy it is writing on SIGTERM, acks it, and exits 0", async () => {
  const work = await tempDir("mda-shutdown");
  cleanups.push(() => work.remove());
  const root = join(work.path, "mail");
  const directoryFile = join(work.path, "directory.yaml");
  await writeFile(directoryFile, "domains:\n  example.test:\nusers:\n  alice@example.test: {}\n");
  const [nats, redis] = await Promise.all([startNats(), startRedis()]);
  cleanups.push(
    () => nats.stop(),
    () => redis.stop(),
  );
  const svc = await startService("mda", {
    env: {
      NATS_URL: nats.url,
      REDIS_URL: redis.url,
      MAILDIR_ROOT: root,
      DIRECTORY_FILE: directoryFile,
      MAIL_HOSTNAME: "mda.example.test",
      SHUTDOWN_TIMEOUT: "30s",
    },
  });
  cleanups.push(() => svc.kill());

  const router = await Bus.connect({
    url: nats.url,
    name: "test-router",
    telemetry: createTelemetry({ service: "router", logLevel: "silent", defaultMetrics: false }),
  });
  cleanups.push(() => router.close());
  // big enough that writing it takes a while, so the signal lands in the middle of it
  const body = randomBytes(30 * 1024 * 1024);
  const ref = await (await router.bodies()).put(newQueueId(), body);
  const queueId = newQueueId();
  const request: LocalDeliveryRequest = {
    v: 1,
    queueId,
    dispatchId: `${queueId}.local.1`,
    receivedAt: new Date().toISOString(),
    mailFrom: "sender@remote.test",
    recipients: [{ mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 }],
    body: ref,
  };
  await router.publish(subjects.deliverLocal(), LocalDeliveryRequest, request, { msgId: request.dispatchId });

  const maildir = join(root, "example.test/alice/Maildir");
  await waitFor(async () => (await list(join(maildir, "tmp"))).length === 1, {
    intervalMs: 5,
    timeoutMs: 30_000,
    message: "the copy being written in tmp/",
  });
  expect(await list(join(maildir, "new"))).toEqual([]); // still in progress
  const code = await svc.stop("SIGTERM", 40_000);
  expect(code).toBe(0);

  const [name] = await list(join(maildir, "new"));
  expect(name).toBeDefined();
  const written = await readFile(join(maildir, "new", name!));
  const expected = createHash("sha256")
    .update(`Return-Path: <sender@remote.test>\r\nDelivered-To: alice@example.test\r\n`)
    .update(body)
    .digest("hex");
  expect(createHash("sha256").update(written).digest("hex")).toBe(expected);
  expect(await list(join(maildir, "tmp"))).toEqual([]);
  expect(svc.logs.some((l) => l.includes('"msg":"mda stopped"'))).toBe(true);

  // acked before exit (nothing for the next replica to redo), and the status is on the stream
  const info = await router.jsm.consumers.info("MAIL_DELIVER", "mda");
  expect(info.num_ack_pending).toBe(0);
  expect(info.num_pending).toBe(0);
  await router.jsm.consumers.add("MAIL_STATUS", {
    durable_name: "test-status",
    ack_policy: AckPolicy.Explicit,
    filter_subject: subjects.statusAll(),
  });
  const batch = await (await router.js.consumers.get("MAIL_STATUS", "test-status")).fetch({
    max_messages: 10,
    expires: 2000,
  });
  const statuses: RecipientStatus[] = [];
  for await (const m of batch) statuses.push(decodeJson(RecipientStatus, m.data));
  expect(statuses).toHaveLength(1);
  expect(statuses[0]).toMatchObject({ queueId, recipient: "alice@example.test", outcome: "delivered" });
}, 120_000);
