// A real validating resolver for tests: Debian's unbound on a loopback port, serving test zones from
// its own auth-zone (for-upstream, no fallback) and validating them against trust anchors made from
// each zone's KSK, as a local unbound behind an MTA with DANE does. Zones are signed with ldnsutils'
// ldns-keygen and ldns-signzone, or left unsigned (no anchor: insecure), or broken on purpose
// (expired signatures, records changed after signing: bogus, which unbound answers with SERVFAIL).
// It never queries anything but its own zones: every outside address is off limits to it.
import { type ChildProcess, execFile, spawn } from "node:child_process";
import dgram from "node:dgram";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import * as dnsPacket from "dns-packet";
import { exitOf, LineBuffer, terminate, track, trackDir, untrackDir } from "./children.ts";
import { freePort, tempDir } from "./process.ts";
import { findBinary } from "./servers.ts";

const run = promisify(execFile);
const TTL = 300;
const RCODES = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"];

export interface UnboundZone {
  /** the zone's name, e.g. "dane.test"; its SOA and NS records are added */
  name: string;
  /**
   * Zone-file lines, owner first, names relative to the zone unless they end with a dot:
   * `"mx1 A 127.0.0.2"`, `"_25._tcp.mx1 TLSA 3 1 1 <hex>"`, `"@ MX 10 mx1"`.
   */
  records: string[];
  /**
   * - `signed` (default): signed with a fresh KSK and ZSK, the KSK's DS is a trust anchor: answers
   *   are secure (AD set).
   * - `unsigned`: no signatures and no trust anchor: answers are insecure (no AD).
   * - `expired`: signed and anchored, but every signature expired yesterday: bogus (SERVFAIL).
   */
  dnssec?: "signed" | "unsigned" | "expired";
  /**
   * `<owner> <TYPE> <rdata>` lines written over the signed zone: each replaces the records of its
   * owner and type, keeping their signatures, which no longer match (an attacker's substitution):
   * answers for that name and type are bogus (SERVFAIL), the rest of the zone stays secure.
   */
  forged?: string[];
}

export interface StartUnboundOptions {
  zones: UnboundZone[];
  /** loopback address to listen on (default 127.0.0.1) */
  host?: string;
  /** default: a free one (UDP and TCP) */
  port?: number;
  /** how long to wait until it answers (default 30 s) */
  readyTimeoutMs?: number;
}

export interface UnboundAnswer {
  rcode: string;
  /** the AD bit: unbound validated the answer */
  authenticated: boolean;
  answers: dnsPacket.Answer[];
}

export interface UnboundHandle {
  readonly host: string;
  readonly port: number;
  /** host:port, for DNS_SERVERS or DANE_RESOLVERS */
  readonly address: string;
  readonly pid: number | undefined;
  /** one query over UDP with RD, AD and EDNS0 (as the project's resolver asks) */
  query(name: string, type: dnsPacket.RecordType, timeoutMs?: number): Promise<UnboundAnswer>;
  /** unbound's log so far (validation failures are logged with their reason) */
  log(): string;
  /** SIGTERM (SIGKILL after 5 s); removes its folder */
  stop(): Promise<void>;
}

const absolute = (name: string, zone: string) =>
  name === "@" ? `${zone}.` : name.endsWith(".") ? name : `${name}.${zone}.`;

/** YYYYMMDDhhmmss (UTC) `days` from now, as ldns-signzone takes it. */
const stamp = (days: number) =>
  new Date(Date.now() + days * 86_400_000).toISOString().replace(/[-:T]/g, "").replace(/\..*$/, "");

function zoneText(zone: UnboundZone): string {
  const origin = `${zone.name}.`;
  return `$ORIGIN ${origin}
$TTL ${TTL}
@ SOA ns.${origin} hostmaster.${origin} 1 3600 600 86400 ${TTL}
@ NS ns.${origin}
ns A 127.0.0.1
${zone.records.join("\n")}
`;
}

/** Replaces the records of each forged line's owner and type in a signed zone (ldns-signzone's layout). */
function forge(signed: string, zone: UnboundZone): string {
  let lines = signed.split("\n");
  for (const line of zone.forged ?? []) {
    const [owner, type, ...rdata] = line.trim().split(/\s+/);
    if (!owner || !type || rdata.length === 0)
      throw new Error(`forged record "${line}": expected <owner> <TYPE> <rdata>`);
    const name = absolute(owner, zone.name).toLowerCase();
    lines = lines.filter((l) => {
      const [o, , , t] = l.split(/\s+/);
      return !(o?.toLowerCase() === name && t?.toUpperCase() === type.toUpperCase());
    });
    lines.push(`${name}\t${TTL}\tIN\t${type.toUpperCase()}\t${rdata.join(" ")}`);
  }
  return `${lines.filter(Boolean).join("\n")}\n`;
}

/** Writes the zone file (signed unless `unsigned`) into `dir`; returns it and the trust anchor file, if any. */
async function prepareZone(dir: string, zone: UnboundZone): Promise<{ zonefile: string; anchor?: string }> {
  await mkdir(dir, { recursive: true });
  const plain = path.join(dir, "zone");
  await writeFile(plain, zoneText(zone));
  const dnssec = zone.dnssec ?? "signed";
  if (dnssec === "unsigned") {
    if (zone.forged?.length) throw new Error(`zone ${zone.name}: forged records need a signed zone`);
    return { zonefile: plain };
  }
  const keygen = async (...flags: string[]) =>
    (await run("ldns-keygen", ["-a", "ECDSAP256SHA256", ...flags, zone.name], { cwd: dir })).stdout.trim();
  const ksk = await keygen("-k");
  const zsk = await keygen();
  // inception a day back, so a clock a little behind unbound's does not matter
  const [inception, expiration] = dnssec === "expired" ? [stamp(-3), stamp(-1)] : [stamp(-1), stamp(30)];
  const signed = path.join(dir, "zone.signed");
  await run("ldns-signzone", ["-i", inception, "-e", expiration, "-f", signed, plain, ksk, zsk], {
    cwd: dir,
  });
  if (zone.forged?.length) await writeFile(signed, forge(await readFile(signed, "utf8"), zone));
  return { zonefile: signed, anchor: path.join(dir, `${ksk}.ds`) };
}

function config(
  dir: string,
  host: string,
  port: number,
  zones: { zone: UnboundZone; zonefile: string; anchor?: string }[],
) {
  const q = (s: string) => JSON.stringify(s);
  // unbound answers some special-use names (test., invalid., onion. …) itself: let the zones through
  const tlds = [...new Set(zones.map(({ zone }) => zone.name.split(".").pop()))];
  return `# written by packages/testing/src/unbound.ts for one test run
server:
  interface: ${host}@${port}
  port: ${port}
  do-ip6: no
  so-reuseport: no
  do-daemonize: no
  chroot: ""
  username: ""
  directory: ${q(dir)}
  pidfile: ${q(path.join(dir, "unbound.pid"))}
  logfile: ""
  use-syslog: no
  log-time-ascii: yes
  verbosity: 1
  val-log-level: 2
  num-threads: 1
  module-config: "validator iterator"
  trust-anchor-signaling: no
  # only its own zones: no root servers, nothing beyond this machine
  outgoing-interface: 127.0.0.1
  do-not-query-address: 0.0.0.0/0
${tlds.map((tld) => `  local-zone: "${tld}." nodefault`).join("\n")}
${zones
  .filter((z) => z.anchor)
  .map((z) => `  trust-anchor-file: ${q(z.anchor!)}`)
  .join("\n")}
remote-control:
  control-enable: no
${zones
  .map(
    (z) => `auth-zone:
  name: "${z.zone.name}."
  zonefile: ${q(z.zonefile)}
  for-upstream: yes
  for-downstream: no
  fallback-enabled: no
`,
  )
  .join("")}`;
}

function ask(
  host: string,
  port: number,
  name: string,
  type: dnsPacket.RecordType,
  timeoutMs: number,
): Promise<UnboundAnswer> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket("udp4");
    const id = Math.floor(Math.random() * 65_536);
    let finished = false;
    const done = (err: Error | undefined, answer?: UnboundAnswer) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      socket.close();
      if (err) reject(err);
      else resolve(answer!);
    };
    const timer = setTimeout(
      () => done(new Error(`no answer from ${host}:${port} within ${timeoutMs} ms`)),
      timeoutMs,
    );
    socket.on("error", (err) => done(err));
    socket.on("message", (message) => {
      const packet = dnsPacket.decode(message);
      if (packet.id !== id) return;
      done(undefined, {
        rcode: RCODES[(packet.flags ?? 0) & 0xf] ?? String((packet.flags ?? 0) & 0xf),
        authenticated: packet.flag_ad ?? false,
        answers: packet.answers ?? [],
      });
    });
    const query = dnsPacket.encode({
      type: "query",
      id,
      flags: dnsPacket.RECURSION_DESIRED | dnsPacket.AUTHENTIC_DATA,
      questions: [{ name, type, class: "IN" }],
      additionals: [{ type: "OPT", name: ".", udpPayloadSize: 1232 } as dnsPacket.OptAnswer],
    });
    socket.send(query, port, host);
  });
}

/** Signs the zones, starts `unbound -d` on loopback, and resolves once it answers. */
export async function startUnbound(options: StartUnboundOptions): Promise<UnboundHandle> {
  const binary = findBinary("unbound");
  const missing = ["unbound", "ldns-keygen", "ldns-signzone"].filter((b) => !findBinary(b));
  if (!binary || missing.length > 0) {
    throw new Error(
      `${missing.join(", ")} not on PATH: run \`. scripts/bootstrap.sh unbound ldns-keygen ldns-signzone\` (as root on Debian it installs unbound and ldnsutils; npm test does)`,
    );
  }
  const host = options.host ?? "127.0.0.1";
  const dir = (await tempDir("mailpipe-unbound")).path;
  trackDir(dir);
  const readyTimeoutMs = options.readyTimeoutMs ?? 30_000;
  let child: ChildProcess | undefined;
  const output = new LineBuffer(400);

  const launch = async (port: number): Promise<"ready" | "port in use"> => {
    const confPath = path.join(dir, "unbound.conf");
    const zones = await Promise.all(
      options.zones.map(async (zone, i) => ({
        zone,
        ...(await prepareZone(path.join(dir, `zone-${i}`), zone)),
      })),
    );
    await writeFile(confPath, config(dir, host, port, zones));
    const c = spawn(binary, ["-d", "-c", confPath], { stdio: ["ignore", "pipe", "pipe"] });
    await new Promise<void>((resolve, reject) => {
      c.once("spawn", resolve);
      c.once("error", reject);
    });
    track(c);
    c.stdout?.on("data", (chunk: Buffer) => output.push(chunk));
    c.stderr?.on("data", (chunk: Buffer) => output.push(chunk));
    child = c;
    const closed = new Promise<void>((resolve) => c.once("close", () => resolve()));
    let exited = false;
    void exitOf(c).then(() => {
      exited = true;
    });
    const deadline = Date.now() + readyTimeoutMs;
    while (Date.now() < deadline && !exited) {
      // localhost. is one of unbound's own local zones: an answer means it is serving
      if (
        await ask(host, port, "localhost", "A", 500).then(
          () => true,
          () => false,
        )
      )
        return "ready";
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    await terminate(c, "SIGKILL", 0);
    // its last words may still be in the pipes
    await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 2_000))]);
    output.end();
    child = undefined;
    if (exited && !options.port && /address already in use/i.test(output.tail(20))) return "port in use";
    throw new Error(
      `unbound on ${host}:${port} ${exited ? `exited (code ${c.exitCode})` : `did not answer within ${readyTimeoutMs} ms`}\n--- unbound output ---\n${output.tail(30)}`,
    );
  };

  let port = options.port ?? 0;
  try {
    for (let attempt = 1; ; attempt++) {
      port = options.port ?? (await freePort(host));
      if ((await launch(port)) === "ready") break;
      if (attempt >= 5) throw new Error(`unbound: no free port on ${host} after ${attempt} tries`);
    }
  } catch (err) {
    untrackDir(dir);
    await rm(dir, { recursive: true, force: true, maxRetries: 3 });
    throw err;
  }

  return {
    host,
    port,
    address: `${host}:${port}`,
    get pid() {
      return child?.pid;
    },
    query: (name, type, timeoutMs = 5_000) => ask(host, port, name, type, timeoutMs),
    log: () => output.lines.join("\n"),
    async stop() {
      if (child) await terminate(child, "SIGTERM", 5_000);
      child = undefined;
      untrackDir(dir);
      await rm(dir, { recursive: true, force: true, maxRetries: 3 });
    },
  };
}
