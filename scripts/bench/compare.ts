// `npm run bench -- compare inbound|relay [--size 2048] [--sessions 20] [--one-per-connection]
//   [--messages 5000] [--rounds 2] [--rate R] [--json FILE] [--log-level info]`
//
// Postfix (a private instance from Debian's package, config in scripts/bench/postfix/) and this
// pipeline, alternately, with the same smtp-source flags, in the same run:
//   inbound  smtp-source → bench@example.test → Maildir (fsync on both sides)
//   relay    smtp-source → fwd@example.test (alias) → sink@remote.test → smtp-sink on 127.0.0.2
// For each run: throughput at acceptance and end to end, CPU per message of every process in the
// load window (utime + stime read from /proc before and after, so start-up is not counted), and for
// the pipeline the latency from acceptance to final (the `received` and `delivered` events).
// `--rate R` paces the load at about R messages a second (R sessions, each waiting a second
// between messages) to read the latency at a given rate.
// Every run is bounded by --messages and --deadline; every process started here is stopped by PID.
import { execFile, spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { readdir, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs, promisify } from "node:util";
import { Bus } from "@mailpipe/bus";
import { type MailEvent, topology } from "@mailpipe/contracts";
import { hashPassword } from "@mailpipe/directory";
import { createTelemetry } from "@mailpipe/telemetry";
import { findBinary, freePort } from "@mailpipe/testing";
import { startPipeline } from "../../tests/e2e/harness.ts";
import { type PrivatePostfix, startPostfix } from "./postfix.ts";

const exec = promisify(execFile);
const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    size: { type: "string", default: "2048" },
    sessions: { type: "string", default: "20" },
    "one-per-connection": { type: "boolean", default: false },
    messages: { type: "string" },
    rounds: { type: "string", default: "2" },
    rate: { type: "string" },
    json: { type: "string" },
    deadline: { type: "string", default: "300" },
    "log-level": { type: "string", default: "info" },
    only: { type: "string" },
    warmup: { type: "string", default: "500" },
    "redis-appendfsync": { type: "string", default: "always" },
    env: { type: "string", multiple: true },
    help: { type: "boolean", default: false },
  },
});
const USAGE = `usage: npm run bench -- compare inbound|relay [options]
  --size BYTES            message size (default 2048)
  --sessions N            smtp-source sessions (default 20)
  --one-per-connection    one message per SMTP connection (default: connections reused)
  --messages N            measured messages per run (default 5000; with --rate, 20 × R)
  --rounds N              runs of each side, alternating (default 2)
  --rate R                pace at about R messages/s (R sessions, one message a second each)
  --warmup N              messages sent first and not measured (default 500)
  --only postfix|mailpipe run one side
  --log-level LEVEL       the pipeline's LOG_LEVEL (default info)
  --redis-appendfsync always|everysec  Redis's AOF policy (default always, as in production)
  --deadline SECONDS      the longest a run may take (default 300)
  --env NAME=VALUE        a configuration variable for the pipeline's services (repeatable),
                          e.g. --env DESTINATION_CONNECTIONS=100
  --json FILE             also write the results as JSON`;
if (values.help) {
  console.log(USAGE);
  process.exit(0);
}
const EXTRA_ENV: Record<string, string> = {};
for (const kv of values.env ?? []) {
  const eq = kv.indexOf("=");
  if (eq < 1) {
    console.error(`--env wants NAME=VALUE, got "${kv}"`);
    process.exit(64);
  }
  EXTRA_ENV[kv.slice(0, eq)] = kv.slice(eq + 1);
}
const mode = positionals[0] === "relay" ? "relay" : "inbound";
if (positionals[0] !== "inbound" && positionals[0] !== "relay") {
  console.error(USAGE);
  process.exit(64);
}
const SIZE = Number(values.size);
const RATE = values.rate ? Number(values.rate) : undefined;
const SESSIONS = RATE ?? Number(values.sessions);
const N = Number(values.messages ?? (RATE ? RATE * 20 : 5000));
const ROUNDS = Number(values.rounds);
const DEADLINE_MS = Number(values.deadline) * 1000;
const REUSE = !values["one-per-connection"];
/** messages sent first and not measured: both sides run warm, as a server in production does */
const WARM = Number(values.warmup);
const SIDES = (values.only ? [values.only] : ["postfix", "mailpipe"]) as Side[];
type Side = "postfix" | "mailpipe";

const smtpSource = findBinary("smtp-source");
const smtpSink = findBinary("smtp-sink");
if (!smtpSource || !smtpSink || !findBinary("postfix")) {
  console.error(
    "smtp-source, smtp-sink and postfix come with Debian's postfix package (scripts/bench.sh installs it)",
  );
  process.exit(2);
}

// --- CPU accounting ----------------------------------------------------------------------------

const TICK = 100; // clock ticks per second (USER_HZ)

function procStat(pid: number): { ppid: number; comm: string; self: number; children: number } | undefined {
  try {
    const raw = readFileSync(`/proc/${pid}/stat`, "utf8");
    const comm = raw.slice(raw.indexOf("(") + 1, raw.lastIndexOf(")"));
    const f = raw.slice(raw.lastIndexOf(")") + 2).split(" ");
    return {
      ppid: Number(f[1]),
      comm,
      self: (Number(f[11]) + Number(f[12])) / TICK,
      children: (Number(f[13]) + Number(f[14])) / TICK,
    };
  } catch {
    return undefined;
  }
}

/**
 * CPU seconds of a process tree by command name: every live process under `root`, plus what the
 * processes that exited already used (their parent's cutime/cstime, counted under the parent).
 * Postfix's daemons come and go; what an exited one used shows up in master's children time.
 */
function treeCpu(root: number): Map<string, number> {
  const kids = new Map<number, number[]>();
  for (const name of readdirSyncSafe("/proc")) {
    const pid = Number(name);
    if (!Number.isInteger(pid)) continue;
    const s = procStat(pid);
    if (s) kids.set(s.ppid, [...(kids.get(s.ppid) ?? []), pid]);
  }
  const out = new Map<string, number>();
  const stack = [root];
  while (stack.length > 0) {
    const pid = stack.pop()!;
    const s = procStat(pid);
    if (!s) continue;
    out.set(s.comm, (out.get(s.comm) ?? 0) + s.self);
    if (s.children > 0) out.set("(exited children)", (out.get("(exited children)") ?? 0) + s.children);
    stack.push(...(kids.get(pid) ?? []));
  }
  return out;
}

function readdirSyncSafe(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

function diff(after: Map<string, number>, before: Map<string, number>): Map<string, number> {
  const out = new Map<string, number>();
  for (const [k, v] of after) out.set(k, Math.max(0, v - (before.get(k) ?? 0)));
  return out;
}

/** CPU seconds this process's reaped children used (smtp-source, once it has exited). */
function childrenCpu(): number {
  return procStat(process.pid)?.children ?? 0;
}

// --- load ----------------------------------------------------------------------------------------

async function runSource(port: number, rcpt: string, n = N): Promise<{ seconds: number; cpu: number }> {
  const before = childrenCpu();
  const started = performance.now();
  const args = [
    ...(REUSE ? ["-d"] : []),
    ...(RATE ? ["-w", "1"] : []),
    "-s",
    String(SESSIONS),
    "-m",
    String(n),
    "-l",
    String(SIZE),
    "-f",
    "sender@bench.test",
    "-t",
    rcpt,
    "-M",
    "bench.test",
    `127.0.0.1:${port}`,
  ];
  await exec(smtpSource!, args, { timeout: DEADLINE_MS });
  return { seconds: (performance.now() - started) / 1000, cpu: childrenCpu() - before };
}

/** Waits until `count` reaches `base + n`; `done` is what arrived beyond `base`. */
async function waitFor(
  count: () => Promise<number>,
  started: number,
  base = 0,
  n = N,
): Promise<{ done: number; seconds: number }> {
  let done = 0;
  while (performance.now() - started < DEADLINE_MS) {
    done = (await count()) - base;
    if (done >= n) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return { done, seconds: (performance.now() - started) / 1000 };
}

/** The warm-up: WARM messages through, not measured; resolves with the count after it. */
async function warmUp(port: number, rcpt: string, count: () => Promise<number>): Promise<number> {
  if (WARM <= 0) return 0;
  await runSource(port, rcpt, WARM);
  await waitFor(count, performance.now(), 0, WARM);
  await new Promise((r) => setTimeout(r, 500));
  return count();
}

function startSink(port: number): { stop(): void; pid: number } {
  // smtp-sink refuses to run as root without -u; 1000 connections at most
  const sink = spawn(smtpSink!, ["-u", "nobody", "-c", `127.0.0.2:${port}`, "1000"], { stdio: "ignore" });
  return { pid: sink.pid!, stop: () => sink.kill("SIGTERM") };
}

// --- the two sides -------------------------------------------------------------------------------

interface RunResult {
  side: Side;
  round: number;
  acceptedPerSecond: number;
  finalPerSecond: number;
  delivered: number;
  cpuMsPerMessage: Record<string, number>;
  totalCpuMs: number;
  sourceCpuMs: number;
  latencyMs?: { p50: number; p95: number; p99: number; max: number };
}

async function runPostfix(round: number): Promise<RunResult> {
  const [port, sinkPort] = [await freePort(), await freePort("127.0.0.2")];
  const sink = mode === "relay" ? startSink(sinkPort) : undefined;
  let pf: PrivatePostfix | undefined;
  try {
    pf = await startPostfix({
      dir: join(tmpdir(), `mailpipe-bench-postfix-${process.pid}-${round}`),
      port,
      sinkPort,
    });
    const { maildir, maillog } = pf;
    const count =
      mode === "relay"
        ? async () => ((await readFile(maillog, "utf8").catch(() => "")).match(/status=sent/g) ?? []).length
        : async () => (await readdir(maildir).catch(() => [])).length;
    const rcpt = mode === "relay" ? "fwd@example.test" : "bench@example.test";
    const base = await warmUp(port, rcpt, count);
    const before = treeCpu(pf.masterPid);
    const started = performance.now();
    const source = await runSource(port, rcpt);
    const end = await waitFor(count, started, base);
    const used = diff(treeCpu(pf.masterPid), before);
    return result("postfix", round, source, end, used);
  } finally {
    await pf?.stop();
    sink?.stop();
  }
}

async function runMailpipe(round: number): Promise<RunResult> {
  const pw = await hashPassword("bench-password-unused");
  const directory = `domains:\n  example.test: {}\nusers:\n  bench@example.test:\n    password: "${pw}"\naliases:\n  fwd@example.test: [sink@remote.test]\n`;
  const p = await startPipeline({
    services: mode === "relay" ? ["router", "delivery", "mx"] : ["router", "mda", "mx"],
    directory,
    dns: {
      "remote.test": { MX: [{ exchange: "sink.remote.test", priority: 10 }] },
      "sink.remote.test": { A: ["127.0.0.2"] },
    },
    // as the production manifests run Redis
    redisAppendfsync: values["redis-appendfsync"] === "everysec" ? "everysec" : "always",
    env: {
      LOG_LEVEL: values["log-level"]!,
      MAX_CONNECTIONS_PER_IP: String(Math.max(20, SESSIONS * 2)),
      ...EXTRA_ENV,
    },
    ...(process.env.BENCH_PROFILE
      ? { nodeArgs: ["--cpu-prof", `--cpu-prof-dir=${process.env.BENCH_PROFILE}`] }
      : {}),
  });
  const sink = mode === "relay" ? startSink(p.ports.remoteSmtp) : undefined;
  try {
    await new Promise((r) => setTimeout(r, 500));
    const procs = (): [string, number | undefined][] => [
      ["nats-server", p.nats.pid],
      ["redis-server", p.redis.pid],
      ...[...p.services].map(([n, s]) => [n, s.pid] as [string, number | undefined]),
    ];
    const snapshot = () => new Map(procs().map(([n, pid]) => [n, (pid && procStat(pid)?.self) || 0]));
    const maildir = join(p.maildirRoot, "example.test", "bench", "Maildir", "new");
    const router = p.services.get("router")!;
    const count =
      mode === "relay"
        ? async () => {
            const text = await (await fetch(router.url("/metrics"))).text();
            return Number(
              /mailpipe_router_final_total\{[^}]*state="delivered"[^}]*\} (\d+)/.exec(text)?.[1] ?? 0,
            );
          }
        : async () => (await readdir(maildir).catch(() => [])).length;
    const rcpt = mode === "relay" ? "fwd@example.test" : "bench@example.test";
    const base = await warmUp(p.ports.mx, rcpt, count);
    const before = snapshot();
    const measuredFrom = Date.now();
    const started = performance.now();
    const source = await runSource(p.ports.mx, rcpt);
    const end = await waitFor(count, started, base);
    const used = diff(snapshot(), before);
    const r = result("mailpipe", round, source, end, used);
    r.latencyMs = await latency(p.env.NATS_URL!, measuredFrom);
    return r;
  } finally {
    sink?.stop();
    await p.stop();
  }
}

/** Acceptance (`received`) to final (`delivered`) per message, from the events stream. */
async function latency(natsUrl: string, from: number): Promise<RunResult["latencyMs"]> {
  const telemetry = createTelemetry({ service: "bench", logLevel: "silent", defaultMetrics: false });
  const bus = await Bus.connect({ url: natsUrl, name: "bench", telemetry });
  try {
    const received = new Map<string, number>();
    const took: number[] = [];
    const consumer = await bus.js.consumers.get(topology.streams.events.name);
    const info = await bus.jsm.streams.info(topology.streams.events.name);
    let left = info.state.messages;
    while (left > 0) {
      const batch = await consumer.fetch({ max_messages: Math.min(left, 1000), expires: 5000 });
      let got = 0;
      for await (const m of batch) {
        got++;
        // the stream also holds the tracking index (mail.v1.track.*), which is not JSON
        if (!m.subject.startsWith("mail.v1.events.")) continue;
        const e = m.json<MailEvent>();
        if (!e.queueId) continue;
        if (e.type === "received" && Date.parse(e.at) >= from) received.set(e.queueId, Date.parse(e.at));
        if (e.type === "delivered") {
          const at = received.get(e.queueId);
          if (at !== undefined) took.push(Date.parse(e.at) - at);
        }
      }
      if (got === 0) break;
      left -= got;
    }
    took.sort((a, b) => a - b);
    if (took.length === 0) return undefined;
    const q = (f: number) => took[Math.min(took.length - 1, Math.floor(f * took.length))]!;
    return { p50: q(0.5), p95: q(0.95), p99: q(0.99), max: took.at(-1)! };
  } finally {
    await bus.close();
  }
}

function result(
  side: Side,
  round: number,
  source: { seconds: number; cpu: number },
  end: { done: number; seconds: number },
  used: Map<string, number>,
): RunResult {
  const perMsg: Record<string, number> = {};
  let total = 0;
  for (const [k, v] of [...used].sort((a, b) => b[1] - a[1])) {
    perMsg[k] = (v / N) * 1000;
    total += v;
  }
  return {
    side,
    round,
    acceptedPerSecond: N / source.seconds,
    finalPerSecond: end.done / end.seconds,
    delivered: end.done,
    cpuMsPerMessage: perMsg,
    totalCpuMs: (total / N) * 1000,
    sourceCpuMs: (source.cpu / N) * 1000,
  };
}

// --- main ----------------------------------------------------------------------------------------

const results: RunResult[] = [];
const header = `${mode}, ${N} messages (after ${WARM} to warm up) of ${SIZE} bytes, ${SESSIONS} smtp-source sessions${REUSE ? " (connections reused)" : ", one message per connection"}${RATE ? `, paced at about ${RATE}/s` : ""}, ${ROUNDS} rounds${
  Object.keys(EXTRA_ENV).length > 0
    ? `; the pipeline with ${Object.entries(EXTRA_ENV)
        .map(([k, v]) => `${k}=${v}`)
        .join(" ")}`
    : ""
}`;
console.log(`compare: ${header}`);
for (let round = 1; round <= ROUNDS; round++) {
  // alternate which side goes first, so neither always gets the warmer machine
  const order = round % 2 === 1 ? SIDES : [...SIDES].reverse();
  for (const side of order) {
    const r = side === "postfix" ? await runPostfix(round) : await runMailpipe(round);
    results.push(r);
    const cpu = Object.entries(r.cpuMsPerMessage)
      .filter(([, v]) => v >= 0.005)
      .map(([k, v]) => `${k} ${v.toFixed(2)}`)
      .join(", ");
    console.log(
      `  round ${round} ${side.padEnd(8)} accepted ${r.acceptedPerSecond.toFixed(0)}/s, final ${r.finalPerSecond.toFixed(0)}/s (${r.delivered}/${N}); CPU ms/msg ${r.totalCpuMs.toFixed(2)} [${cpu}]; smtp-source ${r.sourceCpuMs.toFixed(2)}` +
        (r.latencyMs
          ? `; latency p50 ${r.latencyMs.p50} ms p95 ${r.latencyMs.p95} ms p99 ${r.latencyMs.p99} ms`
          : ""),
    );
  }
}

const mean = (side: Side, f: (r: RunResult) => number) => {
  const rs = results.filter((r) => r.side === side);
  return rs.reduce((n, r) => n + f(r), 0) / Math.max(1, rs.length);
};
console.log("");
console.log("| side | final msg/s (rounds) | mean | CPU ms/msg (whole side) |");
console.log("|---|---|---|---|");
for (const side of SIDES) {
  const rs = results.filter((r) => r.side === side);
  console.log(
    `| ${side} | ${rs.map((r) => r.finalPerSecond.toFixed(0)).join(", ")} | ${mean(side, (r) => r.finalPerSecond).toFixed(0)} | ${mean(side, (r) => r.totalCpuMs).toFixed(2)} |`,
  );
}
if (SIDES.length === 2) {
  console.log(
    `ratio mailpipe/Postfix: throughput ${(mean("mailpipe", (r) => r.finalPerSecond) / mean("postfix", (r) => r.finalPerSecond)).toFixed(2)}, CPU per message ${(mean("mailpipe", (r) => r.totalCpuMs) / mean("postfix", (r) => r.totalCpuMs)).toFixed(2)}`,
  );
}
if (values.json) {
  await writeFile(
    values.json,
    JSON.stringify(
      { mode, size: SIZE, sessions: SESSIONS, reuse: REUSE, rate: RATE, messages: N, results },
      null,
      2,
    ),
  );
}
if (results.some((r) => r.delivered < N)) process.exitCode = 1;
