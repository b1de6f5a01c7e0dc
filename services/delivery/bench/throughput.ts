// Throughput of ONE delivery worker process: N requests (one 2 KB message, one recipient each)
// are queued first, then the worker starts; the figure is N / (time from the worker binding its
// consumer to the N-th status). Run from the repository root:
//
//   node services/delivery/bench/throughput.ts --peer sink            # Postfix smtp-sink (C)
//   node services/delivery/bench/throughput.ts --peer slow            # a peer taking 200 ms per message
//   options: --messages 2000 --concurrency 100 --reuse true
// Requests are published straight to MAIL_DELIVER, without a destination slot: the router's
// destination limits are not in this figure (`npm run bench -- scale` has them).
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import type { Bus } from "@mailpipe/bus";
import {
  freePort,
  type SmtpPeer,
  startNats,
  startRedis,
  startService,
  startSmtpPeer,
} from "@mailpipe/testing";
import { collectStatuses, connectBus, message, mx, publishRequest, resetBus } from "../test/helpers.ts";

const { values } = parseArgs({
  options: {
    messages: { type: "string", default: "2000" },
    peer: { type: "string", default: "sink" },
    concurrency: { type: "string", default: "100" },
    reuse: { type: "string", default: "true" },
    "slow-ms": { type: "string", default: "200" },
    /** write a V8 CPU profile of the worker into this directory */
    profile: { type: "string" },
  },
});
const N = Number(values.messages);
const HOST = "127.0.0.2";
const SMTP_SINK = "/usr/sbin/smtp-sink";

async function startPeer(port: number): Promise<{ stop(): Promise<void>; describe: string }> {
  if (values.peer === "sink") {
    if (!existsSync(SMTP_SINK)) {
      throw new Error(
        `${SMTP_SINK} not found: apt-get install postfix with debconf "No configuration" (see TOOLCHAIN.md)`,
      );
    }
    // smtp-sink refuses to run as root without an unprivileged user to switch to
    const args = [...(process.getuid?.() === 0 ? ["-u", "nobody"] : []), `${HOST}:${port}`, "1000"];
    const child = spawn(SMTP_SINK, args, { stdio: ["ignore", "ignore", "inherit"] });
    await new Promise((r) => setTimeout(r, 300));
    if (child.exitCode !== null) throw new Error(`smtp-sink exited with ${child.exitCode}`);
    return {
      describe: `smtp-sink ${args.join(" ")}`,
      stop: async () => {
        child.kill("SIGTERM");
      },
    };
  }
  const slowMs = Number(values["slow-ms"]);
  const peer: SmtpPeer = await startSmtpPeer({
    host: HOST,
    port,
    script: values.peer === "slow" ? { data: { delayMs: slowMs } } : {},
  });
  return {
    describe:
      values.peer === "slow" ? `@mailpipe/testing peer, ${slowMs} ms per message` : "@mailpipe/testing peer",
    stop: () => peer.stop(),
  };
}

const nats = await startNats();
// the worker connects to Redis for destination slots (these requests carry none)
const redis = await startRedis();
const bus: Bus = await connectBus(nats.url);
await resetBus(bus);
const port = await freePort(HOST);
const peer = await startPeer(port);

// queue everything first, so the figure is the worker's and not the publisher's
const started = performance.now();
const queue = Array.from({ length: N }, (_, i) => i);
await Promise.all(
  Array.from({ length: 32 }, async () => {
    for (let i = queue.shift(); i !== undefined; i = queue.shift()) {
      await publishRequest(bus, {
        domain: "sink.test",
        hosts: [mx("mx.sink.test", 10, HOST)],
        recipients: [`user${i}@sink.test`],
        body: message(`bench ${i}`, `user${i}@sink.test`),
      });
    }
  }),
);
const queuedIn = (performance.now() - started) / 1000;
const statuses = await collectStatuses(bus);

const worker = await startService("delivery", {
  ...(values.profile ? { nodeArgs: ["--cpu-prof", `--cpu-prof-dir=${values.profile}`] } : {}),
  env: {
    NATS_URL: nats.url,
    REDIS_URL: redis.url,
    MAIL_HOSTNAME: "bench.sender.test",
    SMTP_REMOTE_PORT: String(port),
    SMTP_BLOCK_LOCAL_ADDRESSES: "false",
    DELIVERY_CONCURRENCY: values.concurrency,
    SMTP_REUSE_CONNECTIONS: values.reuse,
    LOG_LEVEL: "info",
  },
});
const boundLine = await worker.waitForLog("consuming delivery requests");
const t0 = Date.parse(JSON.parse(boundLine).time as string);
await statuses.waitFor(N, 10 * 60_000);
const t1 = Date.now();
const all = statuses.seen;
const metrics = await (await fetch(worker.url("/metrics"))).text();
const sample = (name: string, label: string) =>
  Number(
    metrics
      .split("\n")
      .find((l) => l.startsWith(`mailpipe_${name}{`) && l.includes(label))
      ?.split(" ")
      .pop() ?? 0,
  );

/** CPU seconds the worker used (user + system), from /proc: less noisy than wall time on a busy host. */
function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ=100)
}
const workerCpu = cpuSeconds(worker.pid);
const seconds = (t1 - t0) / 1000;
const notDelivered = all.find((s) => s.status.outcome !== "delivered");
if (notDelivered) console.error("not delivered, e.g.:", JSON.stringify(notDelivered.status));
const delivered = all.filter((s) => s.status.outcome === "delivered").length;
console.log(
  JSON.stringify(
    {
      peer: peer.describe,
      messages: N,
      messageBytes: Buffer.byteLength(message("bench 0", "user0@sink.test")),
      delivered,
      other: all.length - delivered,
      workerConcurrency: Number(values.concurrency),
      seconds: Number(seconds.toFixed(2)),
      messagesPerSecond: Math.round(N / seconds),
      // includes the worker's start-up (about 1 CPU-second of module loading)
      workerCpuSeconds: workerCpu,
      loadAverage: (await import("node:os")).loadavg()[0]?.toFixed(1),
      connectionsNew: sample("delivery_connections_total", 'reused="false"'),
      connectionsReused: sample("delivery_connections_total", 'reused="true"'),
      queuedInSeconds: Number(queuedIn.toFixed(2)),
    },
    null,
    2,
  ),
);

await worker.stop();
await statuses.stop();
await bus.close();
await peer.stop();
await nats.stop();
await redis.stop();
process.exit(0);
