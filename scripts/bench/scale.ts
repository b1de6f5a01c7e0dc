// `npm run bench -- scale [--replicas 1,2,4] [--messages N] [--destinations D] [--latency MS]
//                         [--concurrency C] [--deadline S]`
//
// How delivery scales out: the same N messages (one recipient, about 2 KB, spread over D destination
// domains, each with its own MX host, so the per-destination limit is not what caps it) go through a
// real router to K delivery workers, for each K of --replicas; the remote side is one SMTP peer that
// takes --latency ms per message (at the end of data). Per K, on a fresh NATS, Redis and router:
//   1. the messages are put on the spool and the router routes them all (workers not started yet);
//   2. K workers start at once; delivered/s is taken between the 10th and the 90th percentile of the
//      arrivals at the peer, so the workers' start-up is not in it.
// It prints delivered/s per K, the factor against the first K, each process's CPU per message during
// the delivery phase, and Redis commands per message (routing, and delivery + statuses). Every run is
// bounded by N and by --deadline.
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { loadavg } from "node:os";
import { parseArgs, promisify } from "node:util";
import { Bus } from "@mailpipe/bus";
import { newQueueId, QueuedMail, subjects } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import { findBinary, freePort, startSmtpPeer } from "@mailpipe/testing";
import { startPipeline } from "../../tests/e2e/harness.ts";

const { values } = parseArgs({
  options: {
    replicas: { type: "string", default: "1,2,4" },
    messages: { type: "string", default: "4000" },
    destinations: { type: "string", default: "200" },
    latency: { type: "string", default: "200" },
    concurrency: { type: "string", default: "100" },
    deadline: { type: "string", default: "300" },
  },
});
const REPLICAS = values.replicas.split(",").map(Number);
const N = Number(values.messages);
const D = Number(values.destinations);
const LATENCY = Number(values.latency);
const C = values.concurrency;
const DEADLINE = Number(values.deadline) * 1000;
const HOST = "127.0.0.2";

function cpuSeconds(pid: number | undefined): number {
  if (!pid) return 0;
  try {
    const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
    return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, clock ticks of 10 ms
  } catch {
    return 0;
  }
}

const redisCli = findBinary("redis-cli") ?? "redis-cli";

/** `redis-cli info commandstats`: calls per command so far. */
async function commandCalls(port: number): Promise<Map<string, number>> {
  const { stdout } = await promisify(execFile)(redisCli, [
    "-h",
    "127.0.0.1",
    "-p",
    String(port),
    "info",
    "commandstats",
  ]);
  const out = new Map<string, number>();
  for (const m of stdout.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) {
    out.set(m[1]!, Number(m[2]));
  }
  return out;
}

function perMessage(before: Map<string, number>, after: Map<string, number>, n: number): string {
  const rows: [string, number][] = [];
  let total = 0;
  for (const [cmd, calls] of after) {
    const d = calls - (before.get(cmd) ?? 0);
    if (cmd === "info" || d <= 0) continue;
    total += d;
    rows.push([cmd, d]);
  }
  rows.sort((a, b) => b[1] - a[1]);
  return `${(total / n).toFixed(2)} (${rows.map(([c, d]) => `${c} ${(d / n).toFixed(2)}`).join(", ")})`;
}

const dns: Record<string, { MX?: { exchange: string; priority: number }[]; A?: string[] }> = {};
for (let i = 0; i < D; i++) {
  dns[`d${i}.test`] = { MX: [{ exchange: `mx.d${i}.test`, priority: 10 }] };
  dns[`mx.d${i}.test`] = { A: [HOST] };
}

interface Result {
  replicas: number;
  delivered: number;
  perSecond: number;
  seconds: number;
  cpuMsPerMessage: Record<string, number>;
  routingCpuMsPerMessage: Record<string, number>;
  redisRouting: string;
  redisDelivery: string;
  load: string;
}

async function run(replicas: number): Promise<Result> {
  const port = await freePort(HOST);
  const peer = await startSmtpPeer({ host: HOST, port, script: { data: { delayMs: LATENCY } } });
  const p = await startPipeline({
    services: [],
    dns,
    env: { LOG_LEVEL: "warn", SMTP_REMOTE_PORT: String(port) },
  });
  const bus = await Bus.connect({
    url: p.nats.url,
    name: "bench-scale",
    telemetry: createTelemetry({ service: "bench", logLevel: "silent", defaultMetrics: false }),
  });
  try {
    const router = await p.start("router");
    const body = Buffer.from(
      `From: <bench@example.test>\r\nSubject: scale\r\n\r\n${"The quick brown fox jumps over the lazy dog. ".repeat(44)}\r\n`,
    );
    const sha256 = createHash("sha256").update(body).digest("hex");
    const beforeRouting = await commandCalls(p.redis.port);
    const routing0 = { redis: cpuSeconds(p.redis.pid), router: cpuSeconds(router.pid) };
    const queue = Array.from({ length: N }, (_, i) => i);
    await Promise.all(
      Array.from({ length: 32 }, async () => {
        for (let i = queue.shift(); i !== undefined; i = queue.shift()) {
          const queueId = newQueueId();
          const mail: QueuedMail = {
            v: 1,
            queueId,
            source: "msa",
            receivedAt: new Date().toISOString(),
            envelope: {
              mailFrom: "bench@example.test",
              rcptTo: [{ address: `u${i}@d${i % D}.test` }],
              smtputf8: false,
              bodyType: "7BIT",
            },
            body: { attached: true, size: body.length, sha256 },
          };
          await bus.publish(subjects.queued(), QueuedMail, mail, { msgId: queueId, attachment: body });
        }
      }),
    );
    const routedBy = Date.now() + DEADLINE;
    for (;;) {
      const text = await (await fetch(router.url("/metrics"))).text();
      const routed = Number(
        /mailpipe_router_routed_total\{[^}]*kind="remote"[^}]*\} (\d+)/.exec(text)?.[1] ?? 0,
      );
      if (routed >= N) break;
      if (Date.now() > routedBy) throw new Error(`the router routed ${routed} of ${N} in time`);
      // seldom: a scrape reads Redis too, and would count in the commands per message
      await new Promise((r) => setTimeout(r, 1000));
    }
    const afterRouting = await commandCalls(p.redis.port);
    const routingCpu = {
      "redis-server": cpuSeconds(p.redis.pid) - routing0.redis,
      router: cpuSeconds(router.pid) - routing0.router,
    };
    const cpu0 = {
      nats: cpuSeconds(p.nats.pid),
      redis: cpuSeconds(p.redis.pid),
      router: cpuSeconds(router.pid),
      peer: process.cpuUsage(),
    };

    const workers = await Promise.all(
      Array.from({ length: replicas }, (_, i) =>
        p.start("delivery", `delivery-${i + 1}`, {
          MAIL_HOSTNAME: `w${i + 1}.bench.test`,
          DELIVERY_CONCURRENCY: C,
        }),
      ),
    );
    const workerCpu0 = workers.map((w) => cpuSeconds(w.pid));
    const deadline = Date.now() + DEADLINE;
    while (peer.messages.length < N && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    // the statuses of the last messages, so the Redis count holds every status
    const finalBy = Date.now() + 30_000;
    while (Date.now() < finalBy) {
      const text = await (await fetch(router.url("/metrics"))).text();
      const final = Number(
        /mailpipe_router_final_total\{[^}]*state="delivered"[^}]*\} (\d+)/.exec(text)?.[1] ?? 0,
      );
      if (final >= peer.messages.length) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    const afterDelivery = await commandCalls(p.redis.port);
    const peerCpu = process.cpuUsage(cpu0.peer);
    const cpu = {
      "nats-server": cpuSeconds(p.nats.pid) - cpu0.nats,
      "redis-server": cpuSeconds(p.redis.pid) - cpu0.redis,
      router: cpuSeconds(router.pid) - cpu0.router,
      "delivery (all)": workers.reduce((s, w, i) => s + cpuSeconds(w.pid) - workerCpu0[i]!, 0),
      "peer (this process)": (peerCpu.user + peerCpu.system) / 1e6,
    };
    const times = peer.messages.map((m) => m.at.getTime()).sort((a, b) => a - b);
    const delivered = times.length;
    const lo = Math.floor(delivered * 0.1);
    const hi = Math.max(lo + 1, Math.floor(delivered * 0.9) - 1);
    const seconds = (times[hi]! - times[lo]!) / 1000;
    return {
      replicas,
      delivered,
      perSecond: seconds > 0 ? (hi - lo) / seconds : 0,
      seconds: (times.at(-1)! - times[0]!) / 1000,
      cpuMsPerMessage: Object.fromEntries(
        Object.entries(cpu).map(([k, v]) => [k, Number(((v / Math.max(1, delivered)) * 1000).toFixed(2))]),
      ),
      routingCpuMsPerMessage: Object.fromEntries(
        Object.entries(routingCpu).map(([k, v]) => [k, Number(((v / N) * 1000).toFixed(2))]),
      ),
      redisRouting: perMessage(beforeRouting, afterRouting, N),
      redisDelivery: perMessage(afterRouting, afterDelivery, Math.max(1, delivered)),
      load: loadavg()
        .map((x) => x.toFixed(1))
        .join(" "),
    };
  } finally {
    await bus.close();
    await p.stop();
    await peer.stop();
  }
}

console.log(
  `scale: ${N} messages over ${D} destinations, peer ${LATENCY} ms per message, DELIVERY_CONCURRENCY=${C} per worker`,
);
const results: Result[] = [];
for (const k of REPLICAS) {
  const r = await run(k);
  results.push(r);
  const base = results[0]!.perSecond;
  console.log(
    `${k} replica(s): ${r.delivered}/${N} delivered, ${r.perSecond.toFixed(0)} delivered/s (10th–90th percentile), ` +
      `${r.seconds.toFixed(1)} s first to last; ${(r.perSecond / base).toFixed(2)}× against ${results[0]!.replicas}; load ${r.load}`,
  );
  console.log(
    `  CPU per message (delivery phase): ${Object.entries(r.cpuMsPerMessage)
      .map(([k, v]) => `${k} ${v} ms`)
      .join(", ")}`,
  );
  console.log(
    `  CPU per message (routing phase): ${Object.entries(r.routingCpuMsPerMessage)
      .map(([k, v]) => `${k} ${v} ms`)
      .join(", ")}`,
  );
  console.log(`  Redis commands per message: routing ${r.redisRouting}`);
  console.log(`  Redis commands per message: delivery and statuses ${r.redisDelivery}`);
}
const first = results[0]!;
const last = results.at(-1)!;
console.log(
  `scaling ${first.replicas} → ${last.replicas} replicas: ${(last.perSecond / first.perSecond).toFixed(2)}× ` +
    `(ideal ${(last.replicas / first.replicas).toFixed(1)}×: ${last.replicas} × ${C} sessions / ${LATENCY} ms = ` +
    `${((last.replicas * Number(C) * 1000) / LATENCY).toFixed(0)} messages/s)`,
);
if (results.some((r) => r.delivered < N)) process.exitCode = 1;
