// Forwarding for the loopback DNS server: a question for a name it does not hold goes to upstream
// resolvers, and their answer is relayed byte for byte (TTLs and all) under the client's query id.
import { randomInt } from "node:crypto";
import dgram from "node:dgram";
import net from "node:net";
import * as dnsPacket from "dns-packet";

export interface DnsForwarding {
  /** Upstream resolvers, "host[:port]" ("[v6]:port" or a bare IPv6 address), port 53 by default; tried in order. */
  servers: string[];
  /**
   * Names at or under these are answered here only (NXDOMAIN when not held), never forwarded:
   * the zones this server is the authority for, and special-use names no resolver should ask about.
   */
  localZones?: string[];
  /**
   * How long one question may wait for the upstreams, all of them together, before it gets SERVFAIL.
   * Default 1500 ms: under a stub resolver's usual 2 s, so the client hears "temporary failure"
   * instead of giving up on silence.
   */
  timeoutMs?: number;
}

interface Upstream {
  host: string;
  port: number;
}

export function parseUpstream(spec: string): Upstream {
  const text = spec.trim();
  const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
  let host: string;
  let port = 53;
  if (bracketed) {
    host = bracketed[1]!;
    if (bracketed[2]) port = Number(bracketed[2]);
  } else if (net.isIPv6(text)) {
    host = text;
  } else {
    const [h = "", p] = text.split(":");
    host = h;
    if (p !== undefined) port = Number(p);
  }
  host = host.replace(/%.*$/, ""); // a link-local zone index: the kernel picks the interface
  if (net.isIP(host) === 0 || !Number.isInteger(port) || port < 1 || port > 65535)
    throw new Error(`invalid upstream DNS server "${spec}": expected an IP address with an optional :port`);
  return { host, port };
}

/** True when `name` is `zone` or under it (both lower case, no trailing dot). */
export function inZone(name: string, zone: string): boolean {
  return zone === "" || name === zone || name.endsWith(`.${zone}`);
}

/** The response answers our query: same id, same question (0x20-safe: names compared in lower case). */
function answers(response: Buffer, id: number, question: dnsPacket.Question): boolean {
  try {
    const packet = dnsPacket.decode(response);
    const echo = packet.questions?.[0];
    return (
      packet.type === "response" &&
      packet.id === id &&
      (!echo || (echo.name.toLowerCase() === question.name.toLowerCase() && echo.type === question.type))
    );
  } catch {
    return false;
  }
}

const withId = (message: Buffer, id: number): Buffer => {
  const copy = Buffer.from(message);
  copy.writeUInt16BE(id, 0);
  return copy;
};

function udpAsk(
  up: Upstream,
  query: Buffer,
  id: number,
  q: dnsPacket.Question,
  ms: number,
): Promise<Buffer | undefined> {
  return new Promise((resolve) => {
    // a fresh connected socket: a random source port, and nothing accepted but the upstream's reply
    const socket = dgram.createSocket(net.isIPv6(up.host) ? "udp6" : "udp4");
    let done = false;
    const finish = (answer?: Buffer) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      try {
        socket.close();
      } catch {
        // closed already
      }
      resolve(answer);
    };
    const timer = setTimeout(() => finish(), ms);
    socket.on("error", () => finish()); // unreachable: ICMP, no route
    socket.on("message", (message) => {
      if (answers(message, id, q)) finish(message);
    });
    socket.connect(up.port, up.host, (err?: Error) => {
      if (err) return finish();
      socket.send(query, (sendErr) => {
        if (sendErr) finish();
      });
    });
  });
}

function tcpAsk(
  up: Upstream,
  query: Buffer,
  id: number,
  q: dnsPacket.Question,
  ms: number,
): Promise<Buffer | undefined> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: up.host, port: up.port });
    let pending = Buffer.alloc(0);
    let done = false;
    const finish = (answer?: Buffer) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(answer);
    };
    const timer = setTimeout(() => finish(), ms);
    socket.on("error", () => finish());
    socket.on("close", () => finish());
    socket.on("connect", () => {
      const prefix = Buffer.alloc(2);
      prefix.writeUInt16BE(query.length);
      socket.write(Buffer.concat([prefix, query]));
    });
    socket.on("data", (chunk) => {
      pending = Buffer.concat([pending, chunk]);
      if (pending.length < 2 || pending.length < 2 + pending.readUInt16BE(0)) return;
      const message = pending.subarray(2, 2 + pending.readUInt16BE(0));
      finish(answers(message, id, q) ? Buffer.from(message) : undefined);
    });
  });
}

const RCODE_MASK = 0x0f;
const rcodeOf = (wire: Buffer) => wire.readUInt16BE(2) & RCODE_MASK;
const TC_BIT = 0x0200;

/**
 * Asks the upstreams in order within `timeoutMs` (UDP, then TCP when the answer is truncated).
 * Resolves with the first NOERROR or NXDOMAIN answer, else the last other answer (an upstream's
 * own SERVFAIL), under the client's id; undefined when no upstream answered in time.
 */
export async function forwardQuery(
  query: Buffer,
  question: dnsPacket.Question,
  upstreams: Upstream[],
  timeoutMs: number,
): Promise<Buffer | undefined> {
  const clientId = query.readUInt16BE(0);
  const deadline = Date.now() + timeoutMs;
  let fallback: Buffer | undefined;
  for (let i = 0; i < upstreams.length; i++) {
    const remaining = deadline - Date.now();
    if (remaining <= 0) break;
    const up = upstreams[i]!;
    // each upstream gets its share of what is left, so a silent first one cannot use it all
    const share = Math.max(1, Math.floor(remaining / (upstreams.length - i)));
    const id = randomInt(0x10000);
    const ours = withId(query, id);
    let answer = await udpAsk(up, ours, id, question, share);
    if (answer && answer.readUInt16BE(2) & TC_BIT) {
      answer = await tcpAsk(up, ours, id, question, Math.max(1, deadline - Date.now()));
    }
    if (!answer) continue;
    const relayed = withId(answer, clientId);
    const rcode = rcodeOf(relayed);
    if (rcode === 0 || rcode === 3) return relayed;
    fallback = relayed;
  }
  return fallback;
}
