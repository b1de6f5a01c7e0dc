// An authoritative DNS server on loopback serving exactly the records a test declares; with
// `forward`, names it does not hold go to upstream resolvers (`npm start` points it at the system's).
import dgram from "node:dgram";
import net from "node:net";
import * as dnsPacket from "dns-packet";
import { type DnsForwarding, forwardQuery, inZone, parseUpstream } from "./dns-forward.ts";

export type { DnsForwarding } from "./dns-forward.ts";

export interface MxRecord {
  exchange: string;
  priority: number;
}

export interface DnsRecords {
  MX?: MxRecord[];
  A?: string[];
  AAAA?: string[];
  /** Each entry is one TXT record; a string longer than 255 bytes is split into character-strings. */
  TXT?: (string | string[])[];
  CNAME?: string;
  PTR?: string[];
  /** DANE records (RFC 6698), published at `_25._tcp.<mx host>`; `data` is the association data. */
  TLSA?: { usage: number; selector: number; matchingType: number; data: Buffer }[];
  /** Default 60. */
  ttl?: number;
  /** Answer every question for this name with this error. */
  rcode?: "NXDOMAIN" | "SERVFAIL" | "REFUSED";
  /** Never answer questions for this name, so the resolver times out. */
  timeout?: boolean;
}

export interface DnsQuery {
  /** Lower case, without the trailing dot. */
  name: string;
  type: string;
  at: Date;
  transport: "udp" | "tcp";
}

export interface StartDnsServerOptions {
  /** Default 127.0.0.1. */
  host?: string;
  /** Default 0: any free port, the same for UDP and TCP. */
  port?: number;
  records?: Record<string, DnsRecords>;
  /**
   * Relay questions for names not in `records` (and not under `forward.localZones`) to these
   * resolvers; when none answers in time the client gets SERVFAIL, a temporary failure. Without
   * it every such name is NXDOMAIN.
   */
  forward?: DnsForwarding;
  /**
   * Answers (positive or negative) for names in these zones carry the AD bit when the query asks
   * for it (AD or DO set, RFC 6840 5.7), as a DNSSEC-validating resolver does for signed zones.
   */
  secureZones?: string[];
}

export interface DnsServerHandle {
  host: string;
  port: number;
  /** "127.0.0.1:PORT", for Resolver.setServers() and DNS_SERVERS. */
  address: string;
  /** Replaces the records of `name`. */
  set(name: string, records: DnsRecords): void;
  remove(name: string): void;
  clear(): void;
  /** Every question received, oldest first. */
  queries: DnsQuery[];
  stop(): Promise<void>;
}

const RCODES = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5 } as const;
const MAX_CNAME_CHAIN = 8;
const PLAIN_UDP_LIMIT = 512;
// What we offer in our own OPT record; 1232 avoids IP fragmentation (DNS flag day 2020).
const OUR_UDP_SIZE = 1232;

function normalize(name: string): string {
  return name.trim().toLowerCase().replace(/\.$/, "");
}

/** The PTR owner name of an address: 127.0.0.2 -> 2.0.0.127.in-addr.arpa. */
export function reverseName(ip: string): string {
  if (net.isIPv4(ip)) return `${ip.split(".").reverse().join(".")}.in-addr.arpa`;
  if (!net.isIPv6(ip)) throw new Error(`not an IP address: ${ip}`);
  const [head = "", tail = ""] = ip.includes("::") ? ip.split("::") : [ip, ""];
  const headGroups = head ? head.split(":") : [];
  const tailGroups = tail ? tail.split(":") : [];
  const zeros = Array<string>(8 - headGroups.length - tailGroups.length).fill("0");
  const hex = [...headGroups, ...zeros, ...tailGroups].map((g) => g.padStart(4, "0")).join("");
  return `${[...hex].reverse().join(".")}.ip6.arpa`;
}

/** Splits text into the <=255-byte character-strings a TXT record is made of. */
function characterStrings(text: string): Buffer[] {
  const bytes = Buffer.from(text, "utf8");
  if (bytes.length === 0) return [bytes];
  const parts: Buffer[] = [];
  for (let i = 0; i < bytes.length; i += 255) parts.push(bytes.subarray(i, i + 255));
  return parts;
}

class Zone {
  private readonly names = new Map<string, DnsRecords>();

  set(name: string, records: DnsRecords): void {
    this.names.set(normalize(name), records);
  }

  remove(name: string): void {
    this.names.delete(normalize(name));
  }

  clear(): void {
    this.names.clear();
  }

  get(name: string): DnsRecords | undefined {
    return this.names.get(normalize(name));
  }

  /** The answer RRs for a known name, following CNAMEs to names this zone knows. */
  answers(name: string, type: string, depth = 0): dnsPacket.Answer[] {
    const records = this.get(name);
    if (!records || records.rcode || records.timeout) return [];
    const ttl = records.ttl ?? 60;
    const own = this.ownAnswers(name, type, records, ttl);
    if (own.length > 0 || type === "CNAME" || !records.CNAME) return own;
    const cname: dnsPacket.Answer = { type: "CNAME", name, ttl, class: "IN", data: normalize(records.CNAME) };
    if (depth >= MAX_CNAME_CHAIN) return [cname];
    return [cname, ...this.answers(records.CNAME, type, depth + 1)];
  }

  private ownAnswers(name: string, type: string, r: DnsRecords, ttl: number): dnsPacket.Answer[] {
    const base = { name, ttl, class: "IN" as const };
    const out: dnsPacket.Answer[] = [];
    const want = (t: string) => type === t || type === "ANY";
    if (want("A")) for (const ip of r.A ?? []) out.push({ ...base, type: "A", data: ip });
    if (want("AAAA")) for (const ip of r.AAAA ?? []) out.push({ ...base, type: "AAAA", data: ip });
    if (want("MX")) {
      for (const mx of r.MX ?? []) {
        out.push({
          ...base,
          type: "MX",
          data: { preference: mx.priority, exchange: normalize(mx.exchange) },
        });
      }
    }
    if (want("TXT")) {
      for (const txt of r.TXT ?? []) {
        const data = (Array.isArray(txt) ? txt : [txt]).flatMap(characterStrings);
        out.push({ ...base, type: "TXT", data });
      }
    }
    if (want("TLSA")) {
      for (const t of r.TLSA ?? []) {
        out.push({
          ...base,
          type: "TLSA",
          data: { usage: t.usage, selector: t.selector, matchingType: t.matchingType, certificate: t.data },
        });
      }
    }
    if (want("PTR")) for (const ptr of r.PTR ?? []) out.push({ ...base, type: "PTR", data: normalize(ptr) });
    if (want("CNAME") && r.CNAME) out.push({ ...base, type: "CNAME", data: normalize(r.CNAME) });
    return out;
  }
}

interface Forwarder {
  upstreams: ReturnType<typeof parseUpstream>[];
  localZones: string[];
  timeoutMs: number;
}

/**
 * Builds the wire answer to one query, or undefined when the name is scripted to time out
 * or the packet is not a query.
 */
async function respond(
  zone: Zone,
  message: Buffer,
  transport: "udp" | "tcp",
  log: (q: DnsQuery) => void,
  forwarder?: Forwarder,
  secureZones: string[] = [],
): Promise<Buffer | undefined> {
  let query: dnsPacket.DecodedPacket;
  try {
    query = dnsPacket.decode(message);
  } catch {
    return undefined;
  }
  if (query.type !== "query") return undefined;
  const opt = query.additionals?.find((rr): rr is dnsPacket.OptAnswer => rr.type === "OPT");
  const question = query.questions?.[0];
  const wantsAd =
    ((query.flags ?? 0) & dnsPacket.AUTHENTIC_DATA) !== 0 || (opt?.flags ?? 0) & dnsPacket.DNSSEC_OK;
  const secure = !!question && !!wantsAd && secureZones.some((z) => inZone(normalize(question.name), z));
  const reply = (rcode: number, answers: dnsPacket.Answer[] = []): dnsPacket.Packet => ({
    type: "response",
    id: query.id,
    flags:
      dnsPacket.AUTHORITATIVE_ANSWER |
      ((query.flags ?? 0) & dnsPacket.RECURSION_DESIRED) |
      (secure ? dnsPacket.AUTHENTIC_DATA : 0) |
      rcode,
    questions: query.questions ?? [],
    answers,
    additionals: opt ? [{ type: "OPT", name: ".", udpPayloadSize: OUR_UDP_SIZE } as dnsPacket.OptAnswer] : [],
  });

  // Over UDP a client takes at most 512 bytes, or what its EDNS0 OPT says; beyond that it gets
  // TC and retries over TCP, which is how resolvers fetch long DKIM keys.
  const limit = transport === "tcp" ? 0xffff : Math.max(PLAIN_UDP_LIMIT, opt?.udpPayloadSize ?? 0);

  let packet: dnsPacket.Packet;
  if (!question) {
    packet = reply(RCODES.FORMERR);
  } else {
    const name = normalize(question.name);
    log({ name, type: question.type, at: new Date(), transport });
    const records = zone.get(name);
    if (records?.timeout) return undefined;
    if (!records && forwarder && !forwarder.localZones.some((z) => inZone(name, z))) {
      const relayed = await forwardQuery(message, question, forwarder.upstreams, forwarder.timeoutMs);
      // relayed as the upstream sent it, unless it is too big for this client's UDP
      if (relayed && relayed.length <= limit) return relayed;
      // too big: the upstream's header with TC, so the client asks again over TCP; no answer in
      // time: SERVFAIL, which every resolver reads as "try again later"
      const flags = relayed
        ? relayed.readUInt16BE(2) | dnsPacket.TRUNCATED_RESPONSE
        : ((query.flags ?? 0) & dnsPacket.RECURSION_DESIRED) |
          dnsPacket.RECURSION_AVAILABLE |
          RCODES.SERVFAIL;
      packet = { ...reply(RCODES.NOERROR), flags };
    } else if (!records) packet = reply(RCODES.NXDOMAIN);
    else if (records.rcode) packet = reply(RCODES[records.rcode]);
    else packet = reply(RCODES.NOERROR, zone.answers(name, question.type));
  }

  const wire = dnsPacket.encode(packet);
  if (wire.length <= limit) return wire;
  return dnsPacket.encode({
    ...packet,
    flags: (packet.flags ?? 0) | dnsPacket.TRUNCATED_RESPONSE,
    answers: [],
  });
}

function bindUdp(socket: dgram.Socket, host: string, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    socket.once("error", reject);
    socket.bind({ address: host, port, exclusive: true }, () => {
      socket.off("error", reject);
      resolve(socket.address().port);
    });
  });
}

function listenTcp(server: net.Server, host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen({ host, port, exclusive: true }, () => {
      server.off("error", reject);
      resolve();
    });
  });
}

export async function startDnsServer(options: StartDnsServerOptions = {}): Promise<DnsServerHandle> {
  const host = options.host ?? "127.0.0.1";
  const zone = new Zone();
  for (const [name, records] of Object.entries(options.records ?? {})) zone.set(name, records);
  const queries: DnsQuery[] = [];
  const log = (q: DnsQuery) => queries.push(q);
  const secureZones = (options.secureZones ?? []).map(normalize);
  const forwarder: Forwarder | undefined = options.forward && {
    upstreams: options.forward.servers.map(parseUpstream),
    localZones: (options.forward.localZones ?? []).map(normalize),
    timeoutMs: options.forward.timeoutMs ?? 1500,
  };
  const sockets = new Set<net.Socket>();

  const makeUdp = () => {
    const udp = dgram.createSocket(net.isIPv6(host) ? "udp6" : "udp4");
    udp.on("message", (message, remote) => {
      void respond(zone, message, "udp", log, forwarder, secureZones).then((answer) => {
        if (answer) udp.send(answer, remote.port, remote.address);
      });
    });
    return udp;
  };
  const makeTcp = () =>
    net.createServer((socket) => {
      sockets.add(socket);
      socket.on("close", () => sockets.delete(socket));
      socket.on("error", () => socket.destroy());
      let pending = Buffer.alloc(0);
      socket.on("data", (chunk) => {
        pending = Buffer.concat([pending, chunk]);
        // TCP messages carry a 2-byte length prefix (RFC 1035 4.2.2); several may arrive at once.
        while (pending.length >= 2) {
          const length = pending.readUInt16BE(0);
          if (pending.length < 2 + length) break;
          const message = pending.subarray(2, 2 + length);
          pending = pending.subarray(2 + length);
          void respond(zone, message, "tcp", log, forwarder, secureZones).then((answer) => {
            if (!answer || socket.destroyed) return;
            const prefix = Buffer.alloc(2);
            prefix.writeUInt16BE(answer.length);
            socket.write(Buffer.concat([prefix, answer]));
          });
        }
      });
    });

  // Port 0 picks a free UDP port, which may be taken on TCP: try a few.
  let udp: dgram.Socket | undefined;
  let tcp: net.Server | undefined;
  let port = 0;
  for (let attempt = 1; !tcp; attempt++) {
    udp = makeUdp();
    port = await bindUdp(udp, host, options.port ?? 0);
    const server = makeTcp();
    try {
      await listenTcp(server, host, port);
      tcp = server;
    } catch (err) {
      udp.close();
      if (options.port || attempt >= 5 || (err as NodeJS.ErrnoException).code !== "EADDRINUSE") throw err;
    }
  }
  const udpSocket = udp!;
  const tcpServer = tcp;

  let stopped: Promise<void> | undefined;
  return {
    host,
    port,
    address: net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`,
    set: (name, records) => zone.set(name, records),
    remove: (name) => zone.remove(name),
    clear: () => zone.clear(),
    queries,
    stop() {
      stopped ??= (async () => {
        for (const socket of sockets) socket.destroy();
        await Promise.all([
          new Promise<void>((resolve) => udpSocket.close(() => resolve())),
          new Promise<void>((resolve) => tcpServer.close(() => resolve())),
        ]);
      })();
      return stopped;
    },
  };
}
