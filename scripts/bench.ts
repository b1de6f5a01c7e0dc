// `npm run bench -- [inbound|relay] [--messages N] [--sessions S] [--size BYTES]`
//
// The pipeline's throughput with Postfix's own load generator, the same way the Postfix figures
// in the issues were taken: `smtp-source` (Debian's postfix package) sending 2 KB messages over S
// sessions, connections reused.
//   inbound: smtp-source → mx → router → mda → Maildir (fsync on): time until N files are on disk.
//   relay:   smtp-source → mx → router (alias to a remote address) → delivery → `smtp-sink`
//            on 127.0.0.2: time until N recipients are final-delivered (router's counter).
// Every run is bounded: N messages, and a deadline after which it reports what it got.
import { execFile, spawn } from "node:child_process";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs, promisify } from "node:util";
import { hashPassword } from "@mailpipe/directory";
import { findBinary } from "@mailpipe/testing";
import { startPipeline } from "../tests/e2e/harness.ts";

const exec = promisify(execFile);
const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    messages: { type: "string", default: "5000" },
    sessions: { type: "string", default: "20" },
    size: { type: "string", default: "2048" },
    deadline: { type: "string", default: "300" },
  },
});
const mode = positionals[0] ?? "inbound";
const N = Number(values.messages);
const S = Number(values.sessions);
const SIZE = Number(values.size);
const DEADLINE = Number(values.deadline) * 1000;

const smtpSource = findBinary("smtp-source");
const smtpSink = findBinary("smtp-sink");
if (!smtpSource || (mode === "relay" && !smtpSink)) {
  console.error(
    "smtp-source/smtp-sink come with Debian's postfix package: " +
      'echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && ' +
      "DEBIAN_FRONTEND=noninteractive apt-get install -y postfix",
  );
  process.exit(2);
}

const pw = await hashPassword("bench-password-unused");
const directory = `domains:
  example.test: {}
users:
  bench@example.test:
    password: "${pw}"
aliases:
  fwd@example.test: [sink@remote.test]
`;

const p = await startPipeline({
  services: mode === "relay" ? ["router", "delivery", "mx"] : ["router", "mda", "mx"],
  directory,
  dns: {
    "remote.test": { MX: [{ exchange: "sink.remote.test", priority: 10 }] },
    "sink.remote.test": { A: ["127.0.0.2"] },
  },
  env: {
    LOG_LEVEL: "warn",
    MAX_CONNECTIONS_PER_IP: String(Math.max(20, S * 2)),
    ...(process.env.UV_THREADPOOL_SIZE ? { UV_THREADPOOL_SIZE: process.env.UV_THREADPOOL_SIZE } : {}),
  },
  // BENCH_PROFILE=<dir>: a V8 CPU profile per service, written when it stops
  ...(process.env.BENCH_PROFILE
    ? { nodeArgs: ["--cpu-prof", `--cpu-prof-dir=${process.env.BENCH_PROFILE}`] }
    : {}),
});

let sink: ReturnType<typeof spawn> | undefined;
try {
  if (mode === "relay") {
    // smtp-sink refuses to run as root without -u
    sink = spawn(smtpSink!, ["-u", "nobody", "-c", `127.0.0.2:${p.ports.remoteSmtp}`, "1000"], {
      stdio: "ignore",
    });
    await new Promise((r) => setTimeout(r, 300));
  }
  const rcpt = mode === "relay" ? "fwd@example.test" : "bench@example.test";
  const started = performance.now();
  // -d: don't disconnect after each message (reuse, as a busy MTA does); -M: our HELO name
  const source = exec(smtpSource!, [
    "-d",
    "-s",
    String(S),
    "-m",
    String(N),
    "-l",
    String(SIZE),
    "-f",
    "sender@bench.test",
    "-t",
    rcpt,
    "-M",
    "bench.test",
    `127.0.0.1:${p.ports.mx}`,
  ]);
  await source;
  const accepted = (performance.now() - started) / 1000;

  let done = 0;
  const deadline = Date.now() + DEADLINE;
  while (Date.now() < deadline) {
    if (mode === "relay") {
      const text = await (await fetch(p.services.get("router")!.url("/metrics"))).text();
      done = Number(/mailpipe_router_final_total\{[^}]*state="delivered"[^}]*\} (\d+)/.exec(text)?.[1] ?? 0);
    } else {
      done = (await readdir(join(p.maildirRoot, "example.test", "bench", "Maildir", "new")).catch(() => []))
        .length;
    }
    if (done >= N) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const total = (performance.now() - started) / 1000;
  const line = (what: string, n: number, s: number) =>
    `${what.padEnd(34)} ${n} in ${s.toFixed(2)} s = ${(n / s).toFixed(0)} messages/s`;
  console.log(
    `mode ${mode}, ${N} messages of ${SIZE} bytes over ${S} smtp-source sessions (connections reused)`,
  );
  console.log(line("accepted by mx (250 after durable)", N, accepted));
  console.log(line(mode === "relay" ? "delivered to smtp-sink" : "in the Maildir (fsync on)", done, total));
  // CPU seconds each process used, per message: where the time goes
  const { readFileSync } = await import("node:fs");
  const cpu = (pid: number | undefined) => {
    if (!pid) return 0;
    const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
    return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, in clock ticks of 10 ms
  };
  const rows: [string, number][] = [
    ["nats-server", cpu(p.nats.pid)],
    ["redis-server", cpu(p.redis.pid)],
    ...[...p.services].map(([name, s]) => [name, cpu(s.pid)] as [string, number]),
  ];
  console.log(
    `CPU per message: ${rows.map(([n, c]) => `${n} ${((c / N) * 1000).toFixed(2)} ms`).join(", ")}`,
  );
  if (done < N) process.exitCode = 1;
} finally {
  sink?.kill("SIGTERM");
  await p.stop();
}
