/*
 * A small stub resolver, written on purpose instead of using node's dns.Resolver: that one gives no
 * TTLs for MX and TXT, and the router must honour TTLs. It is kept small and correct, not complete:
 * one question per query to the configured recursive servers (DNS_SERVERS, else resolv.conf), over
 * UDP with EDNS0 and over TCP when the answer is truncated; CNAME chains followed; a TTL-honouring
 * cache with negative caching (RFC 2308) and coalescing of identical lookups in flight. It does no
 * recursion of its own, no DNSSEC validation and no search-domain expansion: it trusts its servers.
 */
import { domainToASCII } from "node:url";
import type * as dnsPacket from "dns-packet";
import { parseServer, readResolvConf, type ServerAddress } from "./servers.ts";
import { exchange, type Question, rcodeOf } from "./transport.ts";
import {
  type AddressRecord,
  type CacheStats,
  type DnsAnswer,
  DnsError,
  type DnsRecord,
  type DnsResolver,
  isRRType,
  type Lookup,
  type MxRecord,
  type ResolverOptions,
  type RRType,
} from "./types.ts";

/** The AD bit of the DNS header (RFC 4035 3.2.3). */
const AD_FLAG = 1 << 5;
/** CNAME hops followed for one question, inside one answer and across re-queries together. */
const MAX_CNAME_HOPS = 8;
/** RFC 2181 8: a TTL with the top bit set is read as zero. */
const MAX_WIRE_TTL = 0x7fffffff;

/** Lower-cased A-label form without the trailing dot; null for a name that cannot exist in the DNS. */
export function normalizeName(name: string): string | null {
  let n = name.trim().toLowerCase();
  if (n.endsWith(".")) n = n.slice(0, -1);
  if (/[^\p{ASCII}]/u.test(n)) n = domainToASCII(n);
  if (n === "" || n.length > 253) return null;
  for (const label of n.split(".")) if (label.length === 0 || label.length > 63) return null;
  return n;
}

function lowerName(name: string): string {
  const n = name.toLowerCase();
  return n.length > 1 && n.endsWith(".") ? n.slice(0, -1) : n;
}

function wireTtl(ttl: number | undefined): number {
  return ttl === undefined || ttl > MAX_WIRE_TTL ? 0 : ttl;
}

/** The record of our model for one wire RR of the asked type, or undefined when its data is malformed. */
function toRecord(rr: dnsPacket.Answer, type: RRType): DnsRecord | undefined {
  const name = lowerName(rr.name);
  const ttl = wireTtl((rr as { ttl?: number }).ttl);
  const data: unknown = (rr as { data?: unknown }).data;
  switch (type) {
    case "A":
    case "AAAA":
      return typeof data === "string" ? { type, name, ttl, address: data } : undefined;
    case "MX": {
      const mx = data as { preference?: unknown; exchange?: unknown } | undefined;
      if (typeof mx?.preference !== "number" || typeof mx.exchange !== "string") return undefined;
      return { type, name, ttl, priority: mx.preference, exchange: lowerName(mx.exchange) };
    }
    case "TXT": {
      // latin1 keeps every byte, as node's resolveTxt does; SPF/DKIM/DMARC text is ASCII anyway.
      const parts = Array.isArray(data) ? data : [data];
      const strings = parts.map((p) => (Buffer.isBuffer(p) ? p.toString("latin1") : String(p ?? "")));
      return { type, name, ttl, strings };
    }
    case "PTR":
    case "CNAME":
      return typeof data === "string" ? { type, name, ttl, target: lowerName(data) } : undefined;
    case "TLSA": {
      const t = data as {
        usage?: unknown;
        selector?: unknown;
        matchingType?: unknown;
        certificate?: unknown;
      };
      if (
        typeof t?.usage !== "number" ||
        typeof t.selector !== "number" ||
        typeof t.matchingType !== "number"
      ) {
        return undefined;
      }
      if (!Buffer.isBuffer(t.certificate)) return undefined;
      return {
        type,
        name,
        ttl,
        usage: t.usage,
        selector: t.selector,
        matchingType: t.matchingType,
        data: t.certificate,
      };
    }
  }
}

interface Walked {
  nxdomain: boolean;
  records: DnsRecord[];
  /** Where the CNAME chain in the answer section ended (the asked name when there was none). */
  end: string;
  hops: number;
  /** Smallest TTL along the CNAME chain; Infinity without one. */
  chainTtl: number;
  /** RFC 2308 negative TTL from the SOA in the authority section, if there is one. */
  soaTtl: number | undefined;
}

/** Follows the CNAME chain of the answer section from `qname` to the records of the asked type. */
function walk(
  packet: dnsPacket.DecodedPacket,
  qname: string,
  type: RRType,
  hopsSoFar: number,
  server: string,
): Walked {
  const answers = (packet.answers ?? []).filter((rr) => (rr as { class?: string }).class === "IN");
  let current = qname;
  let hops = 0;
  let chainTtl = Number.POSITIVE_INFINITY;
  const seen = new Set([qname]);
  let records: DnsRecord[] = [];
  for (;;) {
    const own = answers.filter((rr) => rr.type === type && lowerName(rr.name) === current);
    records = own.map((rr) => toRecord(rr, type)).filter((r): r is DnsRecord => r !== undefined);
    if (records.length > 0 || type === "CNAME") break;
    const cname = answers.find(
      (rr): rr is dnsPacket.StringAnswer => rr.type === "CNAME" && lowerName(rr.name) === current,
    );
    const target = typeof cname?.data === "string" ? lowerName(cname.data) : undefined;
    if (!cname || target === undefined) break;
    if (seen.has(target)) throw new DnsError("SERVFAIL", qname, type, server, `CNAME loop at ${target}`);
    hops++;
    if (hopsSoFar + hops > MAX_CNAME_HOPS) {
      throw new DnsError("SERVFAIL", qname, type, server, "CNAME chain too long");
    }
    seen.add(target);
    chainTtl = Math.min(chainTtl, wireTtl(cname.ttl));
    current = target;
  }
  const soa = (packet.authorities ?? []).find((rr): rr is dnsPacket.SoaAnswer => rr.type === "SOA");
  const soaTtl = soa ? Math.min(wireTtl(soa.ttl), wireTtl(soa.data.minimum)) : undefined;
  return { nxdomain: rcodeOf(packet) === 3, records, end: current, hops, chainTtl, soaTtl };
}

interface CacheEntry {
  answer: DnsAnswer;
  storedAt: number;
  expiresAt: number;
}

function copyAnswer<T extends RRType>(answer: DnsAnswer<T>, ttl: number, ageSec: number): DnsAnswer<T> {
  return {
    rcode: answer.rcode,
    answers: answer.answers.map((r) => ({ ...r, ttl: Math.max(0, r.ttl - ageSec) })),
    ttl,
    authenticated: answer.authenticated,
  };
}

function toLookup<T extends RRType, R>(answer: DnsAnswer<T>, map: (record: DnsRecord<T>) => R): Lookup<R> {
  if (answer.rcode === "NXDOMAIN") return { kind: "nxdomain", ttl: answer.ttl };
  if (answer.answers.length === 0) return { kind: "nodata", ttl: answer.ttl };
  return { kind: "records", records: answer.answers.map(map), ttl: answer.ttl };
}

function nonNegative(name: string, value: number, integer = false): number {
  if (!Number.isFinite(value) || value < 0 || (integer && !Number.isInteger(value))) {
    throw new RangeError(`createResolver: ${name} must be a non-negative ${integer ? "integer" : "number"}`);
  }
  return value;
}

class StubResolver implements DnsResolver {
  readonly servers: readonly string[];
  private readonly addresses: ServerAddress[];
  private readonly timeoutMs: number;
  private readonly tries: number;
  private readonly useCache: boolean;
  private readonly maxEntries: number;
  private readonly minTtl: number;
  private readonly maxTtl: number;
  private readonly negativeTtl: number;
  private readonly cache = new Map<string, CacheEntry>();
  private readonly inflight = new Map<string, Promise<DnsAnswer>>();
  /** Bumped by clearCache(), so answers already in flight are not stored afterwards. */
  private generation = 0;
  private readonly stats = { hits: 0, misses: 0, coalesced: 0, evictions: 0 };

  constructor(options: ResolverOptions) {
    const specs = options.servers && options.servers.length > 0 ? options.servers : readResolvConf();
    this.addresses = specs.map(parseServer);
    this.servers = this.addresses.map((s) => s.label);
    this.timeoutMs = nonNegative("timeoutMs", options.timeoutMs ?? 2000);
    this.tries = Math.max(1, nonNegative("tries", options.tries ?? 2, true));
    this.useCache = options.cache ?? true;
    this.maxEntries = nonNegative("maxCacheEntries", options.maxCacheEntries ?? 10_000, true);
    this.minTtl = nonNegative("minTtlSec", options.minTtlSec ?? 0);
    this.maxTtl = nonNegative("maxTtlSec", options.maxTtlSec ?? 86_400);
    this.negativeTtl = nonNegative("negativeTtlSec", options.negativeTtlSec ?? 60);
    if (this.minTtl > this.maxTtl) throw new RangeError("createResolver: minTtlSec is above maxTtlSec");
  }

  async query<T extends RRType>(name: string, type: T): Promise<DnsAnswer<T>> {
    if (!isRRType(type)) throw new TypeError(`unsupported DNS record type: ${String(type)}`);
    const qname = normalizeName(name);
    if (qname === null) return { rcode: "NXDOMAIN", answers: [], ttl: 0, authenticated: false };
    const key = `${qname} ${type}`;
    const cached = this.fromCache(key);
    if (cached) {
      this.stats.hits++;
      return cached as DnsAnswer<T>;
    }
    let flight = this.inflight.get(key);
    if (flight) {
      this.stats.coalesced++;
    } else {
      this.stats.misses++;
      const generation = this.generation;
      flight = this.resolve(qname, type, 0).then((answer) => {
        if (generation === this.generation) this.store(key, answer);
        return answer;
      });
      const done = () => this.inflight.delete(key);
      flight.then(done, done);
      this.inflight.set(key, flight);
    }
    // every caller gets its own copy, so one sorting its answers does not reorder another's
    const answer = await flight;
    return copyAnswer(answer, answer.ttl, 0) as DnsAnswer<T>;
  }

  async mx(domain: string): Promise<Lookup<MxRecord>> {
    const answer = await this.query(domain, "MX");
    return toLookup(answer, (r) => ({ exchange: r.exchange, priority: r.priority, ttl: r.ttl }));
  }

  async a(name: string): Promise<Lookup<AddressRecord>> {
    return toLookup(await this.query(name, "A"), (r) => ({ address: r.address, ttl: r.ttl }));
  }

  async aaaa(name: string): Promise<Lookup<AddressRecord>> {
    return toLookup(await this.query(name, "AAAA"), (r) => ({ address: r.address, ttl: r.ttl }));
  }

  async txt(name: string): Promise<Lookup<string[]>> {
    return toLookup(await this.query(name, "TXT"), (r) => r.strings);
  }

  cacheStats(): CacheStats {
    return { size: this.cache.size, ...this.stats };
  }

  clearCache(): void {
    this.cache.clear();
    this.generation++;
  }

  private clamp(ttl: number): number {
    return Math.min(this.maxTtl, Math.max(this.minTtl, Math.floor(ttl)));
  }

  private fromCache(key: string): DnsAnswer | undefined {
    if (!this.useCache) return undefined;
    const entry = this.cache.get(key);
    if (!entry) return undefined;
    const now = Date.now();
    if (now >= entry.expiresAt) {
      this.cache.delete(key);
      return undefined;
    }
    // least recently used goes first: move this one to the end
    this.cache.delete(key);
    this.cache.set(key, entry);
    const ageSec = Math.floor((now - entry.storedAt) / 1000);
    return copyAnswer(entry.answer, Math.ceil((entry.expiresAt - now) / 1000), ageSec);
  }

  private store(key: string, answer: DnsAnswer): void {
    if (!this.useCache || answer.ttl <= 0 || this.maxEntries === 0) return;
    const now = Date.now();
    this.cache.delete(key);
    this.cache.set(key, { answer, storedAt: now, expiresAt: now + answer.ttl * 1000 });
    for (const oldest of this.cache.keys()) {
      if (this.cache.size <= this.maxEntries) break;
      this.cache.delete(oldest);
      this.stats.evictions++;
    }
  }

  /** Asks the servers and interprets the answer; `hops` CNAMEs were already followed to get here. */
  private async resolve(qname: string, type: RRType, hops: number): Promise<DnsAnswer> {
    const { packet, server } = await this.ask({ name: qname, type });
    const w = walk(packet, qname, type, hops, server);
    const authenticated = ((packet.flags ?? 0) & AD_FLAG) !== 0;
    if (w.records.length > 0) {
      const ttl = Math.min(w.chainTtl, ...w.records.map((r) => r.ttl));
      return { rcode: "NOERROR", answers: w.records, ttl: this.clamp(ttl), authenticated };
    }
    if (w.end !== qname && !w.nxdomain && w.soaTtl === undefined) {
      // The server gave the chain but not where it leads (an authoritative server outside its
      // zone does that): ask for the target ourselves, through the cache.
      const key = `${w.end} ${type}`;
      let rest = this.fromCache(key);
      if (!rest) {
        const generation = this.generation;
        rest = await this.resolve(w.end, type, hops + w.hops);
        if (generation === this.generation) this.store(key, rest);
      }
      return {
        ...rest,
        ttl: Math.min(rest.ttl, this.clamp(w.chainTtl)),
        authenticated: authenticated && rest.authenticated,
      };
    }
    const negative = Math.min(w.chainTtl, w.soaTtl ?? this.negativeTtl);
    return {
      rcode: w.nxdomain ? "NXDOMAIN" : "NOERROR",
      answers: [],
      ttl: this.clamp(negative),
      authenticated,
    };
  }

  /** Round-robin through the servers, `tries` rounds; the first NOERROR/NXDOMAIN wins. */
  private async ask(q: Question): Promise<{ packet: dnsPacket.DecodedPacket; server: string }> {
    let failure: DnsError | undefined;
    for (let round = 0; round < this.tries; round++) {
      for (const server of this.addresses) {
        try {
          return { packet: await exchange(q, server, this.timeoutMs), server: server.label };
        } catch (err) {
          if (!(err instanceof DnsError)) throw err;
          // an answer (SERVFAIL, REFUSED) says more than a silence elsewhere: keep reporting it
          const silent = (e: DnsError) => e.code === "TIMEOUT" || e.code === "NETWORK";
          if (!failure || !silent(err) || silent(failure)) failure = err;
        }
      }
    }
    throw failure ?? new DnsError("NETWORK", q.name, q.type, "(none)", "no DNS servers configured");
  }
}

/** A resolver with its own cache; make one per process and share it. */
export function createResolver(options: ResolverOptions = {}): DnsResolver {
  return new StubResolver(options);
}
