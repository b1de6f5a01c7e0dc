// What `npm start` does so that nothing it starts outlives it (scripts/dev.ts uses it):
// - every child runs under `setpriv --pdeathsig SIGTERM` (util-linux, present on every Debian), so
//   the kernel stops it when the supervisor dies, even of SIGKILL;
// - every child is listed in a pid file in the data folder, with its start time, so the next start
//   stops what an earlier one left running, and only that: a pid now held by another process (a
//   reused pid, another start time) is never signalled;
// - a port that is taken is reported with the process holding it.
import { execFile } from "node:child_process";
import { createSocket } from "node:dgram";
import {
  existsSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { createServer, isIPv6 } from "node:net";
import { basename, delimiter, join } from "node:path";
import { promisify } from "node:util";

const execFileP = promisify(execFile);

/** Who a process is, beyond its pid: a pid is reused, a (boot, start time) pair never is. */
export interface ProcessIdentity {
  pid: number;
  /** Field 22 of /proc/<pid>/stat: clock ticks after boot. */
  startTime: string;
  /** /proc/sys/kernel/random/boot_id: a start time is only meaningful within one boot. */
  bootId: string;
  /** The program it runs (the command we gave it), to check against its command line. */
  command: string;
}

export interface PidRecord extends ProcessIdentity {
  name: string;
}

export interface PidFileContent {
  supervisor: ProcessIdentity;
  children: PidRecord[];
}

const bootId = (): string => {
  try {
    return readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
  } catch {
    return "";
  }
};

function startTimeOf(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // the command name (field 2) is in parentheses and may hold spaces: count from after it
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

/** The command line of a process, or undefined when it is gone (or not ours to read). */
export function commandLineOf(pid: number): string[] | undefined {
  try {
    const raw = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return raw.split("\0").filter((s) => s !== "");
  } catch {
    return undefined;
  }
}

/** The identity of a running process, to record now and recognise later. */
export function identify(pid: number, command: string): ProcessIdentity | undefined {
  const startTime = startTimeOf(pid);
  return startTime === undefined ? undefined : { pid, startTime, bootId: bootId(), command };
}

/**
 * True when `recorded` is still the same running process: same boot, same start time, and its
 * command line still runs the recorded program (redis-server rewrites its title, so only the
 * program's name is compared).
 */
export function isAlive(recorded: ProcessIdentity): boolean {
  if (recorded.bootId !== bootId() || startTimeOf(recorded.pid) !== recorded.startTime) return false;
  const argv = commandLineOf(recorded.pid);
  const program = argv?.[0]?.split(" ")[0];
  return program !== undefined && basename(program) === basename(recorded.command);
}

const isRunning = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
};

/** The pid file of one data folder: rewritten whole (write, then rename) on every change. */
export class PidFile {
  private readonly children = new Map<string, PidRecord>();
  private readonly supervisor: ProcessIdentity;
  private written = false;

  readonly path: string;

  constructor(path: string) {
    this.path = path;
    this.supervisor = identify(process.pid, process.execPath) ?? {
      pid: process.pid,
      startTime: "",
      bootId: bootId(),
      command: process.execPath,
    };
  }

  add(name: string, pid: number | undefined, command: string): void {
    const id = pid === undefined ? undefined : identify(pid, command);
    if (!id) return; // it failed to start or is gone already: nothing to stop later
    this.children.set(name, { name, ...id });
    this.write();
  }

  remove(name: string, pid: number | undefined): void {
    if (this.children.get(name)?.pid !== pid) return;
    this.children.delete(name);
    this.write();
  }

  /** Deletes the file, once everything it listed has stopped; never one this process did not write. */
  clear(): void {
    this.children.clear();
    if (this.written) rmSync(this.path, { force: true });
  }

  private write(): void {
    this.written = true;
    const content: PidFileContent = { supervisor: this.supervisor, children: [...this.children.values()] };
    const tmp = `${this.path}.tmp`;
    writeFileSync(tmp, `${JSON.stringify(content, null, 2)}\n`);
    renameSync(tmp, this.path);
  }
}

export function readPidFile(path: string): PidFileContent | undefined {
  try {
    const content = JSON.parse(readFileSync(path, "utf8")) as PidFileContent;
    return Array.isArray(content.children) && content.supervisor ? content : undefined;
  } catch {
    return undefined;
  }
}

async function waitGone(records: PidRecord[], timeoutMs: number): Promise<PidRecord[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const left = records.filter((r) => isRunning(r.pid) && isAlive(r));
    if (left.length === 0 || Date.now() >= deadline) return left;
    await new Promise((r) => setTimeout(r, 100));
  }
}

function signal(records: PidRecord[], sig: NodeJS.Signals): void {
  for (const r of records) {
    try {
      process.kill(r.pid, sig);
    } catch {
      // gone meanwhile
    }
  }
}

export interface StaleOptions {
  /** Names stopped first (they drain into the infrastructure stopped after them). */
  first?: (name: string) => boolean;
  /** How long each group has to stop after SIGTERM before SIGKILL. Default 30 s, 10 s. */
  graceMs?: [number, number];
  say?: (msg: string) => void;
}

export class AlreadyRunningError extends Error {}

/**
 * Stops what an earlier `npm start` on the same data folder left running (its supervisor died
 * without stopping its children), then deletes its pid file. Throws AlreadyRunningError when that
 * supervisor is still alive. Processes listed in the file but now someone else's are left alone.
 */
export async function stopStale(path: string, options: StaleOptions = {}): Promise<PidRecord[]> {
  const content = readPidFile(path);
  if (!content) {
    rmSync(path, { force: true });
    return [];
  }
  const say = options.say ?? (() => {});
  const sup = content.supervisor;
  if (sup.pid !== process.pid && isRunning(sup.pid) && isAlive(sup)) {
    throw new AlreadyRunningError(
      `npm start is already running on this data folder (supervisor pid ${sup.pid}): stop it first (Ctrl-C in its terminal, or kill ${sup.pid}), or give this one another folder with MAILPIPE_DATA_DIR`,
    );
  }
  const ours = content.children.filter((r) => isRunning(r.pid) && isAlive(r));
  const strangers = content.children.filter((r) => isRunning(r.pid) && !isAlive(r));
  for (const r of strangers) say(`pid ${r.pid} (was ${r.name}) now belongs to another process: left alone`);
  if (ours.length > 0) {
    say(
      `stopping what an earlier npm start (pid ${sup.pid}) left running: ${ours.map((r) => `${r.name} (pid ${r.pid})`).join(", ")}`,
    );
    const first = options.first ?? (() => false);
    const [graceFirst, graceRest] = options.graceMs ?? [30_000, 10_000];
    for (const [group, grace] of [
      [ours.filter((r) => first(r.name)), graceFirst],
      [ours.filter((r) => !first(r.name)), graceRest],
    ] as const) {
      if (group.length === 0) continue;
      signal(group, "SIGTERM");
      const left = await waitGone(group, grace);
      signal(left, "SIGKILL");
      const still = await waitGone(left, 5_000);
      if (still.length > 0)
        throw new Error(
          `could not stop ${still.map((r) => `${r.name} (pid ${r.pid})`).join(", ")} left by an earlier npm start`,
        );
    }
  }
  rmSync(path, { force: true });
  return ours;
}

function findOnPath(command: string): string | undefined {
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    const candidate = join(dir, command);
    if (dir && existsSync(candidate)) return candidate;
  }
  for (const dir of ["/usr/bin", "/bin"]) if (existsSync(join(dir, command))) return join(dir, command);
  return undefined;
}

let setpriv: string | null | undefined;

/**
 * The command and arguments that run `command` so that it gets SIGTERM when its parent dies
 * (PR_SET_PDEATHSIG through util-linux's setpriv, which then execs it: no extra process), or the
 * command unchanged where setpriv is missing (the pid file still covers that case).
 */
export function withParentDeathSignal(command: string, args: string[]): [string, string[]] {
  if (setpriv === undefined) setpriv = findOnPath("setpriv") ?? null;
  if (setpriv === null) return [command, args];
  return [setpriv, ["--pdeathsig", "TERM", "--", command, ...args]];
}

export function hasParentDeathSignal(): boolean {
  withParentDeathSignal("true", []);
  return setpriv !== null;
}

/** Listening sockets on `port` from /proc/net/{tcp,tcp6} (or udp, udp6): their inodes. */
function socketInodes(port: number, protocol: "tcp" | "udp"): Set<string> {
  const inodes = new Set<string>();
  const hexPort = port.toString(16).toUpperCase().padStart(4, "0");
  for (const file of [protocol, `${protocol}6`]) {
    let text = "";
    try {
      text = readFileSync(`/proc/net/${file}`, "utf8");
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      // local_address is "ADDR:PORT"; TCP state 0A is LISTEN, UDP 07 is an unconnected socket
      const [, local, , state, , , , , , inode] = f;
      if (!local || !inode || local.split(":")[1] !== hexPort) continue;
      if (state === (protocol === "tcp" ? "0A" : "07")) inodes.add(inode);
    }
  }
  return inodes;
}

/** The processes holding one of these socket inodes, as far as this user may see. */
function holdersOf(inodes: Set<string>): number[] {
  const pids: number[] = [];
  let entries: string[] = [];
  try {
    entries = readdirSync("/proc");
  } catch {
    return pids;
  }
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${entry}/fd`);
    } catch {
      continue; // gone, or another user's
    }
    for (const fd of fds) {
      let target: string;
      try {
        target = readlinkSync(`/proc/${entry}/fd/${fd}`);
      } catch {
        continue;
      }
      const m = /^socket:\[(\d+)\]$/.exec(target);
      if (m && inodes.has(m[1]!)) {
        pids.push(Number(entry));
        break;
      }
    }
  }
  return pids;
}

/** The processes listening on `port`, as far as this user may see. */
export function listenersOf(port: number, protocol: "tcp" | "udp" = "tcp"): number[] {
  const inodes = socketInodes(port, protocol);
  return inodes.size > 0 ? holdersOf(inodes) : [];
}

const describePid = (pid: number): string => {
  const argv = commandLineOf(pid);
  const cmd = argv ? argv.join(" ") : "";
  return `pid ${pid}${cmd ? ` (${cmd.length > 160 ? `${cmd.slice(0, 157)}...` : cmd})` : ""}`;
};

/**
 * Who holds `port`: "pid 123 (nats-server -p 14222 ...)", from /proc, or from `ss -lnp` when /proc
 * shows the socket but not its owner; a hint to look as root when neither can tell.
 */
export async function portHolder(port: number, protocol: "tcp" | "udp" = "tcp"): Promise<string> {
  const pids = listenersOf(port, protocol);
  if (pids.length > 0) return pids.map(describePid).join(", ");
  try {
    const { stdout } = await execFileP(
      "ss",
      ["-Hlnp", protocol === "tcp" ? "-t" : "-u", `sport = :${port}`],
      {
        timeout: 3000,
      },
    );
    const seen = [...new Set([...stdout.matchAll(/pid=(\d+)/g)].map((m) => Number(m[1])))];
    if (seen.length > 0) return seen.map(describePid).join(", ");
  } catch {
    // no ss, or it failed: fall through
  }
  return `a process this user cannot see (another user's: \`sudo ss -lnp${protocol === "tcp" ? "t" : "u"} 'sport = :${port}'\` names it)`;
}

/** True when nothing holds host:port (a bind attempt, so any address that would collide counts). */
export function portFree(port: number, host: string, protocol: "tcp" | "udp" = "tcp"): Promise<boolean> {
  return new Promise((resolve) => {
    if (protocol === "udp") {
      const socket = createSocket(isIPv6(host) ? "udp6" : "udp4");
      socket.once("error", () => resolve(false));
      socket.bind({ port, address: host, exclusive: true }, () => socket.close(() => resolve(true)));
      return;
    }
    const server = createServer();
    server.once("error", () => resolve(false));
    server.listen({ port, host, exclusive: true }, () => server.close(() => resolve(true)));
  });
}

export interface PortUse {
  port: number;
  /** What npm start wants it for: "NATS", "mx SMTP", "router health". */
  what: string;
  /** How to move it: "DEV_NATS_PORT or NATS_URL". */
  setting: string;
  /** Default tcp. */
  protocol?: "tcp" | "udp";
}

/** Fails with one message naming every taken port, who holds it, and the variable that moves it. */
export async function ensurePortsFree(uses: PortUse[], host: string): Promise<void> {
  const taken: string[] = [];
  for (const use of uses) {
    const protocol = use.protocol ?? "tcp";
    // a process just stopped (what an earlier npm start left running) may take a moment to let go
    let free = await portFree(use.port, host, protocol);
    for (let i = 0; !free && i < 15; i++) {
      await new Promise((r) => setTimeout(r, 200));
      free = await portFree(use.port, host, protocol);
    }
    if (free) continue;
    taken.push(
      `${protocol === "udp" ? "UDP " : ""}port ${use.port} (${use.what}) is taken by ${await portHolder(use.port, protocol)}: stop it, or set ${use.setting}`,
    );
  }
  if (taken.length > 0) throw new Error(taken.join("\n  "));
}
