// The real service process: readiness, and a SIGKILL in the middle of a run.
import { readdir, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Bus } from "@mailpipe/bus";
import { decodeJson, LocalDeliveryRequest, newQueueId, RecipientStatus, subjects } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import {
  freePort,
  type NatsHandle,
  type ServerHandle,
  type ServiceHandle,
  startNats,
  startRedis,
  startService,
  tempDir,
  waitFor,
} from "@mailpipe/testing";
import { AckPolicy } from "@nats-io/jetstream";
import { afterEach, expect, it } from "vitest";

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await Promise.resolve(c()).catch(() => {});
});

const USERS = ["alice", "bob", "carol"];

async function readyz(url: string): Promise<{ status: number; body: unknown }> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
    return { status: res.status, body: await res.json() };
  } catch {
    return { status: 0, body: undefined };
  }
}

/** name → path of every file under root whose parent folder is `sub` */
async function filesIn(root: string, sub: "new" | "tmp"): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const entries = await readdir(root, { recursive: true, withFileTypes: true }).catch(() => []);
  for (const e of entries) {
    if (e.isFile() && e.parentPath.endsWith(`/${sub}`)) {
      // a name seen twice (in two folders) is kept under a second key, so duplicates still count
      const key = out.has(e.name) ? `${e.name}#${out.size}` : e.name;
      out.set(key, join(e.parentPath, e.name));
    }
  }
  return out;
}

it("is ready only with NATS and Redis, and delivers every copy exactly once across a SIGKILL", async () => {
  const work = await tempDir("mda-crash");
  cleanups.push(() => work.remove());
  const root = join(work.path, "mail");
  const directoryFile = join(work.path, "directory.yaml");
  await writeFile(
    directoryFile,
    `domains:\n  example.test:\nusers:\n${USERS.map((u) => `  ${u}@example.test: {}\n`).join("")}`,
  );
  const nats: NatsHandle = await startNats();
  cleanups.push(() => nats.stop());
  const redisPort = await freePort();
  const env = {
    NATS_URL: nats.url,
    REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    MAILDIR_ROOT: root,
    DIRECTORY_FILE: directoryFile,
    MAIL_HOSTNAME: "mda.example.test",
    MDA_CONCURRENCY: "4",
    MDA_ACK_WAIT: "2s",
    LOG_LEVEL: "warn",
  };

  // Redis is not up yet: the process answers, but is not ready
  const httpPort = await freePort();
  const starting = startService("mda", { env: { ...env, HTTP_PORT: String(httpPort) } });
  let svc: ServiceHandle | undefined;
  cleanups.push(async () => (svc ?? (await starting.catch(() => undefined)))?.kill());
  const readyUrl = `http://127.0.0.1:${httpPort}/readyz`;
  await waitFor(async () => (await readyz(readyUrl)).status === 503, {
    message: "/readyz 503 without Redis",
  });
  const redis: ServerHandle = await startRedis({ port: redisPort });
  cleanups.push(() => redis.stop());
  svc = await starting;
  expect(await readyz(readyUrl)).toEqual({
    status: 200,
    body: { ready: true, checks: { nats: true, redis: true } },
  });

  const router = await Bus.connect({
    url: nats.url,
    name: "test-router",
    telemetry: createTelemetry({ service: "router", logLevel: "silent", defaultMetrics: false }),
  });
  cleanups.push(() => router.close());
  const body = await (await router.bodies()).put(newQueueId(), Buffer.alloc(256 * 1024, "x\r\n"));

  // 300 requests, one copy each, and every tenth with a second copy into bob's "news" folder
  const expected = new Set<string>();
  const requests: LocalDeliveryRequest[] = [];
  for (let i = 0; i < 300; i++) {
    const queueId = newQueueId();
    const user = USERS[i % USERS.length]!;
    const recipients: LocalDeliveryRequest["recipients"] = [
      { mailbox: `${user}@example.test`, address: `${user}@example.test`, attempt: 1 },
    ];
    if (i % 10 === 0) {
      recipients.push({
        mailbox: "bob@example.test",
        address: "bob+news@example.test",
        folder: "news",
        attempt: 1,
      });
    }
    for (const r of recipients) expected.add(`${queueId} ${r.address}`);
    requests.push({
      v: 1,
      queueId,
      dispatchId: `${queueId}.local.1`,
      receivedAt: new Date().toISOString(),
      mailFrom: "sender@remote.test",
      recipients,
      body,
    });
  }
  await Promise.all(
    requests.map((r) =>
      router.publish(subjects.deliverLocal(), LocalDeliveryRequest, r, { msgId: r.dispatchId }),
    ),
  );

  // crash in the middle of the run
  await waitFor(async () => (await filesIn(root, "new")).size >= 30, {
    intervalMs: 5,
    timeoutMs: 30_000,
    message: "first deliveries",
  });
  await svc.kill();
  const atCrash = (await filesIn(root, "new")).size;
  expect(atCrash).toBeLessThan(expected.size); // the crash really came midway

  svc = await startService("mda", { env });
  await waitFor(async () => (await filesIn(root, "new")).size >= expected.size, {
    timeoutMs: 60_000,
    message: "every copy delivered after the restart",
  });
  await waitFor(
    async () => {
      const info = await router.jsm.consumers.info("MAIL_DELIVER", "mda");
      return info.num_pending === 0 && info.num_ack_pending === 0;
    },
    { timeoutMs: 30_000, message: "every request acked" },
  );

  // exactly one file per (queue id, recipient), each complete, none left in tmp/
  const delivered = await filesIn(root, "new");
  expect(delivered.size).toBe(expected.size);
  const seen = new Set<string>();
  for (const [name, path] of delivered) {
    const m = /\.Q([0-9A-Z]{26})R[0-9a-f]{10}\..*,S=(\d+)$/.exec(name);
    expect(m, name).not.toBeNull();
    expect(seen.has(name), `duplicate ${name}`).toBe(false);
    seen.add(name);
    expect((await stat(path)).size, `${name} is complete`).toBe(Number(m![2]));
  }
  const newsCopies = [...delivered.values()].filter((p) => p.includes("/bob/Maildir/.news/new/"));
  expect(newsCopies).toHaveLength(30);
  expect([...(await filesIn(root, "tmp")).values()]).toEqual([]);

  // and a delivered status for every copy (JetStream drops the repeats by msg id)
  await router.jsm.consumers.add("MAIL_STATUS", {
    durable_name: "test-status",
    ack_policy: AckPolicy.Explicit,
    filter_subject: subjects.statusAll(),
  });
  const consumer = await router.js.consumers.get("MAIL_STATUS", "test-status");
  const reported = new Set<string>();
  await waitFor(
    async () => {
      const batch = await consumer.fetch({ max_messages: 500, expires: 1000 });
      for await (const m of batch) {
        const s = decodeJson(RecipientStatus, m.data);
        expect(s.outcome).toBe("delivered");
        reported.add(`${s.queueId} ${s.recipient}`);
        m.ack();
      }
      return reported.size >= expected.size;
    },
    { timeoutMs: 30_000, message: "a delivered status per copy" },
  );
  expect([...reported].sort()).toEqual([...expected].sort());
}, 120_000);
