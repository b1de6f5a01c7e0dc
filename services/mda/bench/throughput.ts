// Throughput of the real mda process with fsync on: publishes N local delivery requests (2 KB bodies,
// one recipient each) and times until N delivered statuses are on MAIL_STATUS.
//
//   node services/mda/bench/throughput.ts [N=3000] [mailboxes=10]
//
// Env: MDA_CONCURRENCY, MDA_FSYNC (passed through), PRELOAD=1 to publish everything before mda starts
// (measures mda alone instead of mda racing the publisher for the CPU).
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Bus } from "@mailpipe/bus";
import { decodeJson, LocalDeliveryRequest, newQueueId, RecipientStatus, subjects } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import { type ServiceHandle, startNats, startRedis, startService, tempDir } from "@mailpipe/testing";
import { AckPolicy } from "@nats-io/jetstream";

/** CPU seconds (user + system) a process has used so far, from /proc (Linux). */
async function cpuSeconds(pid: number | undefined): Promise<number> {
  if (pid === undefined) return Number.NaN;
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
}

const n = Number(process.argv[2] ?? 3000);
const mailboxes = Number(process.argv[3] ?? 10);
const preload = process.env.PRELOAD === "1";

const work = await tempDir("mda-bench");
const [nats, redis] = await Promise.all([startNats(), startRedis()]);
let svc: ServiceHandle | undefined;
try {
  const directoryFile = join(work.path, "directory.yaml");
  const users = Array.from({ length: mailboxes }, (_, i) => `user${i}@example.test`);
  await writeFile(
    directoryFile,
    `domains:\n  example.test:\nusers:\n${users.map((u) => `  ${u}: {}\n`).join("")}`,
  );
  const env = {
    NATS_URL: nats.url,
    REDIS_URL: redis.url,
    MAILDIR_ROOT: join(work.path, "mail"),
    DIRECTORY_FILE: directoryFile,
    MAIL_HOSTNAME: "bench.example.test",
    LOG_LEVEL: "warn",
    MDA_CONCURRENCY: process.env.MDA_CONCURRENCY ?? "32",
    MDA_FSYNC: process.env.MDA_FSYNC ?? "true",
  };
  const router = await Bus.connect({
    url: nats.url,
    name: "bench",
    telemetry: createTelemetry({ service: "router", logLevel: "silent", defaultMetrics: false }),
  });
  await router.ensureTopology();
  const body = await (await router.bodies()).put(newQueueId(), Buffer.alloc(2048, "bench line\r\n"));
  await router.jsm.consumers.add("MAIL_STATUS", {
    durable_name: "bench-status",
    ack_policy: AckPolicy.Explicit,
    filter_subject: subjects.statusAll(),
  });

  const publishAll = async () => {
    const window = 256;
    let next = 0;
    await Promise.all(
      Array.from({ length: window }, async () => {
        while (next < n) {
          const i = next++;
          const queueId = newQueueId();
          const user = users[i % users.length]!;
          const req: LocalDeliveryRequest = {
            v: 1,
            queueId,
            dispatchId: `${queueId}.local.1`,
            receivedAt: new Date().toISOString(),
            mailFrom: "sender@remote.test",
            recipients: [{ mailbox: user, address: user, attempt: 1 }],
            body,
          };
          await router.publish(subjects.deliverLocal(), LocalDeliveryRequest, req, { msgId: req.dispatchId });
        }
      }),
    );
  };

  if (preload) await publishAll();
  svc = await startService("mda", { env });
  const consumer = await router.js.consumers.get("MAIL_STATUS", "bench-status");
  const pids = { mda: svc.pid, nats: nats.pid, redis: redis.pid, bench: process.pid };
  const cpuBefore = await Promise.all(Object.values(pids).map(cpuSeconds));
  const started = performance.now();
  const publishing = preload ? Promise.resolve() : publishAll();
  let delivered = 0;
  let other = 0;
  const messages = await consumer.consume({ max_messages: 1000 });
  for await (const m of messages) {
    const s = decodeJson(RecipientStatus, m.data);
    m.ack();
    if (s.outcome === "delivered") delivered++;
    else other++;
    if (delivered + other >= n) break;
  }
  const seconds = (performance.now() - started) / 1000;
  const cpuAfter = await Promise.all(Object.values(pids).map(cpuSeconds));
  const cpu = Object.keys(pids)
    .map((name, i) => `${name} ${(((cpuAfter[i]! - cpuBefore[i]!) * 1000) / n).toFixed(2)}`)
    .join(", ");
  await publishing;
  await messages.close();
  process.stdout.write(
    `${n} requests (2 KB, 1 recipient, ${mailboxes} mailboxes, concurrency ${env.MDA_CONCURRENCY}, ` +
      `fsync ${env.MDA_FSYNC}${preload ? ", preloaded" : ""}): ${delivered} delivered, ${other} other in ` +
      `${seconds.toFixed(2)} s = ${Math.round(n / seconds)} requests/s\n` +
      `CPU ms per request: ${cpu}\n`,
  );
  await router.close();
} finally {
  await svc?.stop();
  await Promise.all([nats.stop(), redis.stop()]);
  await work.remove();
}
