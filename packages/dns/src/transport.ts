// One DNS exchange with one server: UDP (EDNS0) first, TCP when the answer comes back truncated.
import { randomInt } from "node:crypto";
import dgram from "node:dgram";
import { lookup } from "node:dns/promises";
import net from "node:net";
import * as dnsPacket from "dns-packet";
import type { ServerAddress } from "./servers.ts";
import { DnsError, type RRType } from "./types.ts";

/** Our EDNS0 UDP payload size: 1232 avoids IP fragmentation (DNS flag day 2020). */
export const EDNS_UDP_SIZE = 1232;
const RCODE_MASK = 0x0f;
const HOST_CACHE_MS = 60_000;

export interface Question {
  /** Normalised: lower case, no trailing dot. */
  name: string;
  type: RRType;
}

/** The address to send to; a server given by host name is looked up through the system and remembered a while. */
const hostAddresses = new Map<
  string,
  { at: number; address: Promise<{ address: string; family: number }> }
>();
function serverAddress(server: ServerAddress): Promise<{ address: string; family: number }> {
  const family = net.isIP(server.host);
  if (family !== 0) return Promise.resolve({ address: server.host, family });
  const known = hostAddresses.get(server.host);
  if (known && Date.now() - known.at < HOST_CACHE_MS) return known.address;
  const address = lookup(server.host);
  hostAddresses.set(server.host, { at: Date.now(), address });
  address.catch(() => hostAddresses.delete(server.host));
  return address;
}

function encodeQuery(id: number, q: Question, edns: boolean): Buffer {
  return dnsPacket.encode({
    type: "query",
    id,
    // AD in a query asks a validating resolver to say whether it validated the answer (RFC 6840 5.7)
    flags: dnsPacket.RECURSION_DESIRED | dnsPacket.AUTHENTIC_DATA,
    questions: [{ type: q.type, name: q.name, class: "IN" }],
    additionals: edns
      ? [{ type: "OPT", name: ".", udpPayloadSize: EDNS_UDP_SIZE } as dnsPacket.OptAnswer]
      : [],
  });
}

/** The numeric RCODE of a response, with the EDNS0 extended bits. */
export function rcodeOf(packet: dnsPacket.DecodedPacket): number {
  const opt = packet.additionals?.find((rr): rr is dnsPacket.OptAnswer => rr.type === "OPT");
  return ((opt?.extendedRcode ?? 0) << 4) | ((packet.flags ?? 0) & RCODE_MASK);
}

/**
 * The decoded response when `message` answers our query (same id, same question), else undefined:
 * over UDP anything else is a stray or spoofed packet and is ignored. A FORMERR may omit the question.
 */
function matchResponse(message: Buffer, id: number, q: Question): dnsPacket.DecodedPacket | undefined {
  let packet: dnsPacket.DecodedPacket;
  try {
    packet = dnsPacket.decode(message);
  } catch {
    return undefined;
  }
  if (packet.type !== "response" || packet.id !== id) return undefined;
  const questions = packet.questions ?? [];
  if (questions.length === 0) return rcodeOf(packet) === 1 ? packet : undefined;
  const [echo] = questions;
  if (questions.length !== 1 || !echo) return undefined;
  const sameName = echo.name.toLowerCase().replace(/\.$/, "") === q.name;
  if (!sameName || echo.type !== q.type || (echo.class ?? "IN") !== "IN") return undefined;
  return packet;
}

interface Attempt {
  q: Question;
  server: ServerAddress;
  timeoutMs: number;
}

function udpExchange(
  a: Attempt,
  address: string,
  family: number,
  edns: boolean,
): Promise<dnsPacket.DecodedPacket> {
  const id = randomInt(0x10000);
  const query = encodeQuery(id, a.q, edns);
  return new Promise((resolve, reject) => {
    // A fresh socket per query: the kernel picks a random source port, and connect() makes it
    // drop datagrams from anyone but the server and report ICMP "port unreachable" as an error.
    const socket = dgram.createSocket(family === 6 ? "udp6" : "udp4");
    let done = false;
    const finish = (error: DnsError | undefined, packet?: dnsPacket.DecodedPacket) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      try {
        socket.close();
      } catch {
        // already closed
      }
      if (error) reject(error);
      else resolve(packet!);
    };
    const timer = setTimeout(
      () =>
        finish(new DnsError("TIMEOUT", a.q.name, a.q.type, a.server.label, `no answer in ${a.timeoutMs} ms`)),
      a.timeoutMs,
    );
    const networkError = (err: NodeJS.ErrnoException) =>
      finish(new DnsError("NETWORK", a.q.name, a.q.type, a.server.label, err.code ?? err.message, err));
    socket.on("error", networkError);
    socket.on("message", (message) => {
      const packet = matchResponse(message, id, a.q);
      if (packet) finish(undefined, packet);
    });
    socket.connect(a.server.port, address, (err?: Error) => {
      if (done) return; // timed out meanwhile: the socket is closed
      if (err) networkError(err);
      else
        socket.send(query, (sendErr) => {
          if (sendErr) networkError(sendErr);
        });
    });
  });
}

function tcpExchange(a: Attempt, address: string): Promise<dnsPacket.DecodedPacket> {
  const id = randomInt(0x10000);
  const query = encodeQuery(id, a.q, true);
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: address, port: a.server.port });
    let done = false;
    let pending = Buffer.alloc(0);
    const finish = (error: DnsError | undefined, packet?: dnsPacket.DecodedPacket) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      if (error) reject(error);
      else resolve(packet!);
    };
    const fail = (code: "NETWORK" | "TIMEOUT", detail: string, cause?: unknown) =>
      finish(new DnsError(code, a.q.name, a.q.type, a.server.label, `tcp: ${detail}`, cause));
    const timer = setTimeout(() => fail("TIMEOUT", `no answer in ${a.timeoutMs} ms`), a.timeoutMs);
    socket.on("error", (err: NodeJS.ErrnoException) => fail("NETWORK", err.code ?? err.message, err));
    socket.on("close", () => fail("NETWORK", "connection closed before the answer"));
    socket.on("connect", () => {
      const prefix = Buffer.alloc(2);
      prefix.writeUInt16BE(query.length);
      socket.write(Buffer.concat([prefix, query]));
    });
    socket.on("data", (chunk) => {
      pending = Buffer.concat([pending, chunk]);
      if (pending.length < 2) return;
      const length = pending.readUInt16BE(0);
      if (pending.length < 2 + length) return;
      const packet = matchResponse(pending.subarray(2, 2 + length), id, a.q);
      if (packet) finish(undefined, packet);
      else fail("NETWORK", "answer does not match the query");
    });
  });
}

const RCODE_ERRORS: Record<number, "FORMERR" | "SERVFAIL" | "REFUSED"> = {
  1: "FORMERR",
  2: "SERVFAIL",
  5: "REFUSED",
};

/**
 * Asks one server one question. Resolves with a NOERROR or NXDOMAIN response; any other RCODE,
 * a timeout or a network failure rejects with a DnsError naming the server.
 */
export async function exchange(
  q: Question,
  server: ServerAddress,
  timeoutMs: number,
): Promise<dnsPacket.DecodedPacket> {
  const a: Attempt = { q, server, timeoutMs };
  let address: { address: string; family: number };
  try {
    address = await serverAddress(server);
  } catch (err) {
    throw new DnsError("NETWORK", q.name, q.type, server.label, "cannot resolve the server's own name", err);
  }
  let packet = await udpExchange(a, address.address, address.family, true);
  // RFC 6891 7: a server that does not know EDNS0 answers FORMERR (or BADVERS); ask again without it.
  if (rcodeOf(packet) === 1 || rcodeOf(packet) === 16)
    packet = await udpExchange(a, address.address, address.family, false);
  if (packet.flag_tc) packet = await tcpExchange(a, address.address);
  const rcode = rcodeOf(packet);
  if (rcode === 0 || rcode === 3) return packet;
  const code = RCODE_ERRORS[rcode] ?? "SERVFAIL";
  throw new DnsError(
    code,
    q.name,
    q.type,
    server.label,
    code === RCODE_ERRORS[rcode] ? undefined : `rcode ${rcode}`,
  );
}
