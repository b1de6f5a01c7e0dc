// A real rspamd (Debian's package) for tests, on loopback with a configuration of its own: no Redis,
// no DNS (its resolver points at a closed port), only the modules the tests use, and a tiny public
// suffix list (compiling the full one takes rspamd half a minute on a busy machine).
import { type ChildProcess, spawn } from "node:child_process";
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { exitOf, LineBuffer, terminate, track, trackDir, untrackDir } from "./children.ts";
import { freePort, tempDir } from "./process.ts";
import { findBinary } from "./servers.ts";

const HOST = "127.0.0.1";

/** Strings in a message body that trigger the test configuration's rules (besides GTUBE). */
export const RSPAMD_TEST_TRIGGERS = {
  /** stands in for a virus signature: symbol MAILPIPE_TEST_VIRUS, action reject */
  virus: "MAILPIPE-TEST-VIRUS",
  /** action add header (score 7) */
  spam: "MAILPIPE-TEST-SPAM",
  /** action rewrite subject (score 9) */
  rewrite: "MAILPIPE-TEST-REWRITE",
  /** action greylist (score 5) */
  greylist: "MAILPIPE-TEST-GREYLIST",
  /** action soft reject */
  softReject: "MAILPIPE-TEST-SOFT-REJECT",
} as const;

/** The GTUBE test string: rspamd rejects any message holding it. */
export const GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

export interface RspamdHandle {
  /** http://127.0.0.1:PORT (the normal worker: /checkv2, /ping) */
  readonly url: string;
  readonly port: number;
  readonly pid: number | undefined;
  /** SIGTERM (SIGKILL after 5 s); removes its folder */
  stop(): Promise<void>;
  /** stops it, keeping the folder, so start() can bring it back on the same port */
  pause(): Promise<void>;
  /** starts it again after pause() and waits until it answers /ping */
  start(): Promise<void>;
}

export interface StartRspamdOptions {
  port?: number;
  /** how long to wait for /ping (default 120 s: the first start compiles its regular expressions) */
  readyTimeoutMs?: number;
}

function config(dir: string, port: number): string {
  const content = (symbol: string, file: string, extra: string) =>
    `  ${symbol} { type = "content"; filter = "text"; regexp = true; map = "${path.join(dir, file)}"; ${extra} }\n`;
  return `# written by @mailpipe/testing for one test run
options {
  filters = "regexp";
  dns { nameserver = ["127.0.0.1:9"]; timeout = 200ms; retransmits = 1; }
  local_addrs = [];
  explicit_modules = ["settings"];
  allow_raw_input = true;
  task_timeout = 8s;
  hs_cache_dir = "${dir}/";
  cache_file = "${dir}/symbols.cache";
  url_tld = "${dir}/tld.dat";
  control_socket = "${dir}/rspamd.sock mode=0600";
  dynamic_conf = "${dir}/dynamic";
  history_file = "${dir}/history";
  stats_file = "${dir}/stats.ucl";
}
logging { type = "file"; filename = "${dir}/rspamd.log"; level = "notice"; }
worker "normal" { bind_socket = "${HOST}:${port}"; count = 1; }
actions {
  reject = 15;
  rewrite_subject = 8;
  add_header = 6;
  greylist = 4;
  subject = "[SPAM] %s";
}
lua = "$RULESDIR/rspamd.lua";
modules { path = "$PLUGINSDIR"; }
milter_headers {
  use = ["x-rspamd-queue-id", "remove-spam-flag"];
  skip_local = false;
  skip_authenticated = false;
}
multimap {
${content("MAILPIPE_TEST_VIRUS", "virus.map", 'action = "reject"; message = "Virus found: MAILPIPE-TEST-VIRUS"; score = 100;')}${content("MAILPIPE_TEST_SPAM", "spam.map", 'action = "add header"; score = 7;')}${content("MAILPIPE_TEST_REWRITE", "rewrite.map", 'action = "rewrite subject"; score = 9;')}${content("MAILPIPE_TEST_GREYLIST", "greylist.map", 'action = "greylist"; score = 5;')}${content("MAILPIPE_TEST_SOFT", "soft.map", 'action = "soft reject"; message = "Try again later (test)"; score = 1;')}}
`;
}

async function ping(url: string): Promise<boolean> {
  try {
    const res = await fetch(`${url}/ping`, { signal: AbortSignal.timeout(1000) });
    return res.ok && (await res.text()).trim() === "pong";
  } catch {
    return false;
  }
}

/** Starts rspamd -f on loopback with the test configuration; resolves once /ping answers. */
export async function startRspamd(options: StartRspamdOptions = {}): Promise<RspamdHandle> {
  const binary = findBinary("rspamd");
  if (!binary) throw new Error("rspamd is not on PATH: apt-get install rspamd (npm test installs it)");
  const dir = (await tempDir("mailpipe-rspamd")).path;
  trackDir(dir);
  const port = options.port ?? (await freePort(HOST));
  const url = `http://${HOST}:${port}`;
  const t = RSPAMD_TEST_TRIGGERS;
  await Promise.all([
    writeFile(path.join(dir, "rspamd.conf"), config(dir, port)),
    writeFile(path.join(dir, "tld.dat"), "com\norg\nnet\ntest\ninvalid\nexample\n"),
    writeFile(path.join(dir, "virus.map"), `/${t.virus}/\n`),
    writeFile(path.join(dir, "spam.map"), `/${t.spam}/\n`),
    writeFile(path.join(dir, "rewrite.map"), `/${t.rewrite}/\n`),
    writeFile(path.join(dir, "greylist.map"), `/${t.greylist}/\n`),
    writeFile(path.join(dir, "soft.map"), `/${t.softReject}/\n`),
  ]);
  const readyTimeoutMs = options.readyTimeoutMs ?? 120_000;
  let child: ChildProcess | undefined;
  let output = new LineBuffer(40);

  const launch = async () => {
    output = new LineBuffer(40);
    const args = ["-f", "-c", path.join(dir, "rspamd.conf"), `--var=DBDIR=${dir}`, `--var=RUNDIR=${dir}`];
    // rspamd refuses to run its workers as root unless told to (CI runs as root)
    if (process.getuid?.() === 0) args.push("-i");
    const c = spawn(binary, args, { stdio: ["ignore", "pipe", "pipe"] });
    await new Promise<void>((resolve, reject) => {
      c.once("spawn", resolve);
      c.once("error", reject);
    });
    track(c);
    c.stdout?.on("data", (chunk: Buffer) => output.push(chunk));
    c.stderr?.on("data", (chunk: Buffer) => output.push(chunk));
    child = c;
    let exited = false;
    exitOf(c).then(() => {
      exited = true;
    });
    const deadline = Date.now() + readyTimeoutMs;
    while (Date.now() < deadline && !exited) {
      if (await ping(url)) return;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    await terminate(c, "SIGKILL", 0);
    output.end();
    throw new Error(
      `rspamd on ${url} ${exited ? `exited (code ${c.exitCode})` : `did not answer /ping within ${readyTimeoutMs} ms`}\n--- rspamd output ---\n${output.tail(20)}`,
    );
  };

  await launch().catch(async (err) => {
    untrackDir(dir);
    await tempCleanup(dir);
    throw err;
  });

  const halt = async () => {
    if (child) await terminate(child, "SIGTERM", 5_000);
    child = undefined;
  };
  return {
    url,
    port,
    get pid() {
      return child?.pid;
    },
    async stop() {
      await halt();
      untrackDir(dir);
      await tempCleanup(dir);
    },
    pause: halt,
    async start() {
      if (child) return;
      await launch();
    },
  };
}

async function tempCleanup(dir: string): Promise<void> {
  const { rm } = await import("node:fs/promises");
  await rm(dir, { recursive: true, force: true, maxRetries: 3 });
}
