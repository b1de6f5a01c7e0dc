// Rough throughput of mx alone: messages/s accepted and published (stored + JetStream-acked) for
// 2 KB messages over reused connections. Not a test; run it by hand:
//
//   node services/mx/bench/throughput.ts [--messages 5000] [--sessions 50] [--size 2048] [--profile]
//
// Load comes from Postfix's smtp-source (`apt-get install postfix`, "No configuration") with -d so
// connections are reused (smtp-server holds each new connection 100 ms before its greeting); mx runs
// as its own process against a local nats-server. --profile writes a CPU profile of mx and prints
// where its time went.
import { execFile } from "node:child_process";
import { readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { Writable } from "node:stream";
import { parseArgs, promisify } from "node:util";
import { Bus } from "@mailpipe/bus";
import { topology } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import { findBinary, freePort, startDnsServer, startNats, startService, tempDir } from "@mailpipe/testing";

const { values } = parseArgs({
  options: {
    messages: { type: "string", default: "5000" },
    sessions: { type: "string", default: "50" },
    size: { type: "string", default: "2048" },
    profile: { type: "boolean", default: false },
  },
});
const messages = Number(values.messages);
const sessions = Number(values.sessions);
const size = Number(values.size);

const smtpSource = findBinary("smtp-source");
if (!smtpSource) {
  console.error("smtp-source not found: apt-get install postfix (choose 'No configuration')");
  process.exit(1);
}

const nats = await startNats();
const dns = await startDnsServer({
  records: {
    "bench.test": { TXT: ["v=spf1 ip4:127.0.0.1 -all"] },
    "_dmarc.bench.test": { TXT: ["v=DMARC1; p=none"] },
  },
});
const dir = await tempDir("mx-bench");
const directoryFile = path.join(dir.path, "directory.yaml");
await writeFile(directoryFile, "domains:\n  example.test:\nusers:\n  alice@example.test: {}\n");
const port = await freePort();
const mx = await startService("mx", {
  env: {
    NATS_URL: nats.url,
    MAIL_HOSTNAME: "mx.bench",
    MX_HOST: "127.0.0.1",
    MX_PORT: String(port),
    DNS_SERVERS: dns.address,
    DIRECTORY_FILE: directoryFile,
    MAX_CONNECTIONS_PER_IP: String(sessions * 2),
    LOG_LEVEL: "warn",
  },
  nodeArgs: values.profile ? ["--cpu-prof", `--cpu-prof-dir=${dir.path}`] : [],
});

try {
  const started = performance.now();
  const { stdout, stderr } = await promisify(execFile)(
    smtpSource,
    [
      "-d",
      "-s",
      String(sessions),
      "-l",
      String(size),
      "-m",
      String(messages),
      "-f",
      "sender@bench.test",
      "-t",
      "alice@example.test",
      "-M",
      "client.bench",
      `127.0.0.1:${port}`,
    ],
    { timeout: 600_000, maxBuffer: 16 * 1024 * 1024 },
  );
  const seconds = (performance.now() - started) / 1000;
  if (stderr.trim()) console.error(stderr.trim());
  if (stdout.trim()) console.log(stdout.trim());

  const telemetry = createTelemetry({
    service: "router",
    defaultMetrics: false,
    logDestination: new Writable({ write: (_c, _e, cb) => cb() }),
  });
  const bus = await Bus.connect({ url: nats.url, name: "mx-bench", telemetry });
  const queued = (await bus.jsm.streams.info(topology.streams.queued.name)).state.messages;
  await bus.close();
  console.log(
    `${messages} messages of ${size} bytes over ${sessions} reused sessions: ${seconds.toFixed(1)} s, ` +
      `${(messages / seconds).toFixed(0)} messages/s; ${queued} published on ${topology.streams.queued.name}`,
  );
} finally {
  await mx.stop();
  if (values.profile) await summarise(dir.path);
  await Promise.allSettled([nats.stop(), dns.stop()]);
  await dir.remove();
}

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

/** Self time by function and by package, from the .cpuprofile mx wrote on exit. */
async function summarise(folder: string): Promise<void> {
  const file = (await readdir(folder)).find((f) => f.endsWith(".cpuprofile"));
  if (!file) return console.log("(no CPU profile written)");
  const profile = JSON.parse(await readFile(path.join(folder, file), "utf8")) as {
    nodes: ProfileNode[];
    samples: number[];
  };
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const total = profile.samples.length;
  const fns = new Map<string, number>();
  const pkgs = new Map<string, number>();
  for (const id of profile.samples) {
    const n = byId.get(id);
    if (!n) continue;
    const url = n.callFrame.url;
    const pkg =
      /node_modules\/\.pnpm\/([^/]+)\//.exec(url)?.[1]?.replace(/@[\d.]+.*$/, "") ??
      (/\/(packages|services)\/([^/]+)\//.exec(url)?.slice(1, 3).join("/") ||
        (url.startsWith("node:") ? "node core" : "(native/idle/gc)"));
    const fn = `${n.callFrame.functionName || "(anonymous)"} ${url.split("/").slice(-2).join("/")}:${n.callFrame.lineNumber + 1}`;
    fns.set(fn, (fns.get(fn) ?? 0) + 1);
    pkgs.set(pkg, (pkgs.get(pkg) ?? 0) + 1);
  }
  const top = (m: Map<string, number>, k: number) =>
    [...m.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, k)
      .map(([name, n]) => `  ${((100 * n) / total).toFixed(1).padStart(5)}%  ${name}`)
      .join("\n");
  console.log(`mx CPU profile (${total} samples), self time by package:\n${top(pkgs, 12)}`);
  console.log(`by function:\n${top(fns, 20)}`);
}
