// The real mda process with MDA_BACKEND=lmtp, SIGKILLed right after Dovecot accepted a copy and
// before the status went out: the restarted process reports the copy and does not deliver it again.

import { writeFile } from "node:fs/promises";
import net from "node:net";
import { join } from "node:path";
import { Bus } from "@mailpipe/bus";
import { decodeJson, LocalDeliveryRequest, newQueueId, RecipientStatus, subjects } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import {
  type DovecotHandle,
  freePort,
  imapFetchAll,
  type NatsHandle,
  type ServerHandle,
  type ServiceHandle,
  startDovecot,
  startNats,
  startRedis,
  startService,
  tempDir,
  waitFor,
} from "@mailpipe/testing";
import { AckPolicy } from "@nats-io/jetstream";
import { Redis } from "ioredis";
import { afterEach, expect, it } from "vitest";
import { doneKey } from "./deliver.ts";

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await Promise.resolve(c()).catch(() => {});
});

/**
 * An LMTP proxy in front of Dovecot that runs `onFinalReply` once, just before it passes on the
 * first reply to come after an end of data: the moment Dovecot has the copy and mda does not know.
 */
async function lmtpProxy(target: number, onFinalReply: () => void): Promise<{ port: number; close(): void }> {
  let fired = false;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect({ host: "127.0.0.1", port: target });
    sockets.add(client).add(upstream);
    let afterData = false;
    let tail = "";
    client.on("data", (chunk) => {
      tail = (tail + chunk.toString("latin1")).slice(-5);
      if (tail === "\r\n.\r\n") afterData = true;
      upstream.write(chunk);
    });
    upstream.on("data", (chunk) => {
      if (afterData && !fired) {
        fired = true;
        onFinalReply();
      }
      client.write(chunk);
    });
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

it("SIGKILL after Dovecot's 250 and before the status: redelivered, reported, not delivered twice", async () => {
  const work = await tempDir("mda-lmtp-crash");
  cleanups.push(() => work.remove());
  const directoryFile = join(work.path, "directory.yaml");
  await writeFile(directoryFile, "domains:\n  example.test:\nusers:\n  carol@example.test: {}\n");
  const nats: NatsHandle = await startNats();
  cleanups.push(() => nats.stop());
  const redisServer: ServerHandle = await startRedis();
  cleanups.push(() => redisServer.stop());
  const dovecot: DovecotHandle = await startDovecot({ users: [{ address: "carol@example.test" }] });
  cleanups.push(() => dovecot.stop());
  const redis = new Redis(redisServer.url);
  cleanups.push(() => redis.disconnect());

  // the moment Dovecot answers the end of data, freeze NATS: mda gets the 250 and records it,
  // but can neither publish the status nor ack the request
  let natsFrozen = false;
  const proxy = await lmtpProxy(Number(new URL(dovecot.lmtpUrl).port), () => {
    process.kill(nats.pid!, "SIGSTOP");
    natsFrozen = true;
  });
  cleanups.push(() => proxy.close());
  cleanups.push(() => {
    if (natsFrozen) process.kill(nats.pid!, "SIGCONT");
  });

  const env = {
    NATS_URL: nats.url,
    REDIS_URL: redisServer.url,
    DIRECTORY_FILE: directoryFile,
    MAIL_HOSTNAME: "mda.example.test",
    MDA_BACKEND: "lmtp",
    LMTP_URL: `lmtp://127.0.0.1:${proxy.port}`,
    MDA_ACK_WAIT: "2s",
    LOG_LEVEL: "warn",
  };
  let svc: ServiceHandle = await startService("mda", {
    env: { ...env, HTTP_PORT: String(await freePort()) },
  });
  cleanups.push(() => svc.kill());

  const router = await Bus.connect({
    url: nats.url,
    name: "test-router",
    telemetry: createTelemetry({ service: "router", logLevel: "silent", defaultMetrics: false }),
  });
  cleanups.push(() => router.close());
  const queueId = newQueueId();
  const body = await (await router.bodies()).put(queueId, Buffer.from("Subject: once only\r\n\r\nhello\r\n"));
  const req: LocalDeliveryRequest = {
    v: 1,
    queueId,
    dispatchId: `${queueId}.local.1`,
    receivedAt: new Date().toISOString(),
    mailFrom: "sender@remote.test",
    recipients: [{ mailbox: "carol@example.test", address: "carol@example.test", attempt: 1 }],
    body,
  };
  await router.publish(subjects.deliverLocal(), LocalDeliveryRequest, req, { msgId: req.dispatchId });

  // Dovecot has the copy and mda recorded it; then the process dies
  const marker = await waitFor(() => redis.get(doneKey(queueId, "carol@example.test")), {
    timeoutMs: 20_000,
    message: "the delivery marker",
  });
  expect(natsFrozen).toBe(true);
  expect(marker).toMatch(/^lmtp 250 2\.0\.0 <carol@example\.test> \S+ Saved$/);
  await svc.kill();
  process.kill(nats.pid!, "SIGCONT");
  natsFrozen = false;
  expect(
    (await imapFetchAll({ port: dovecot.imapPort, user: "carol@example.test", password: "secret" })).length,
  ).toBe(1);

  // the request was never acked: JetStream redelivers it to the new process
  svc = await startService("mda", { env: { ...env, HTTP_PORT: String(await freePort()) } });
  await router.jsm.consumers.add("MAIL_STATUS", {
    durable_name: "test-status",
    ack_policy: AckPolicy.Explicit,
    filter_subject: subjects.statusAll(),
  });
  const consumer = await router.js.consumers.get("MAIL_STATUS", "test-status");
  const statuses: RecipientStatus[] = [];
  await waitFor(
    async () => {
      const batch = await consumer.fetch({ max_messages: 10, expires: 1000 });
      for await (const m of batch) {
        statuses.push(decodeJson(RecipientStatus, m.data));
        m.ack();
      }
      const info = await router.jsm.consumers.info("MAIL_DELIVER", "mda");
      return statuses.length >= 1 && info.num_pending === 0 && info.num_ack_pending === 0;
    },
    { timeoutMs: 30_000, message: "a status, and the request acked" },
  );
  expect(statuses).toHaveLength(1);
  expect(statuses[0]).toMatchObject({ outcome: "delivered", recipient: "carol@example.test" });
  // the reply reported is the one Dovecot gave the first process
  expect(`lmtp ${statuses[0]!.reply.code} ${statuses[0]!.reply.enhanced} ${statuses[0]!.reply.text}`).toBe(
    marker,
  );
  const inbox = await imapFetchAll({
    port: dovecot.imapPort,
    user: "carol@example.test",
    password: "secret",
  });
  expect(inbox).toHaveLength(1);
  expect(inbox[0]!.raw).toContain("Subject: once only");
}, 90_000);
