/** The record types this client asks for. */
export const RR_TYPES = ["A", "AAAA", "MX", "TXT", "PTR", "CNAME", "TLSA"] as const;
export type RRType = (typeof RR_TYPES)[number];

export function isRRType(value: string): value is RRType {
  return (RR_TYPES as readonly string[]).includes(value);
}

/** The data of one record, by type. Names are lower case, without the trailing dot ("." is the root). */
export interface RecordData {
  A: { address: string };
  AAAA: { address: string };
  MX: { exchange: string; priority: number };
  /** The character-strings of one TXT record, each at most 255 bytes; join them for SPF/DKIM/DMARC. */
  TXT: { strings: string[] };
  PTR: { target: string };
  CNAME: { target: string };
  TLSA: { usage: number; selector: number; matchingType: number; data: Buffer };
}

/** One resource record of the answer; `ttl` in seconds, counting down while it sits in the cache. */
export type DnsRecord<T extends RRType = RRType> = {
  [K in T]: { type: K; name: string; ttl: number } & RecordData[K];
}[T];

export interface DnsAnswer<T extends RRType = RRType> {
  /** NODATA is NOERROR with no answers. */
  rcode: "NOERROR" | "NXDOMAIN";
  /** The records of the asked type at the end of any CNAME chain. */
  answers: DnsRecord<T>[];
  /** Seconds this answer (positive or negative) may be reused: clamped, and the remaining time on a cache hit. */
  ttl: number;
  /**
   * The server set AD: it validated the answer with DNSSEC. Means something only from a validating
   * resolver reached over a trusted path (DANE_VALIDATING_RESOLVERS); anyone else can set the bit.
   */
  authenticated: boolean;
}

/** Every one of these is temporary: the caller should try again later (the router defers). */
export type DnsErrorCode = "SERVFAIL" | "TIMEOUT" | "REFUSED" | "FORMERR" | "NETWORK";

export class DnsError extends Error {
  readonly code: DnsErrorCode;
  /** The name asked for. */
  readonly qname: string;
  readonly qtype: string;
  /** "host:port" of the server that failed last, or "(none)". */
  readonly server: string;
  /** Always true: no DnsError is a permanent answer. */
  readonly temporary = true;

  constructor(
    code: DnsErrorCode,
    qname: string,
    qtype: string,
    server: string,
    detail?: string,
    cause?: unknown,
  ) {
    super(
      `DNS ${qtype} ${qname} via ${server}: ${code}${detail ? ` (${detail})` : ""}`,
      cause === undefined ? undefined : { cause },
    );
    this.name = "DnsError";
    this.code = code;
    this.qname = qname;
    this.qtype = qtype;
    this.server = server;
  }
}

/** The result of a typed helper: records, or which kind of "nothing" it was. `ttl` as in DnsAnswer. */
export type Lookup<R> =
  | { kind: "records"; records: R[]; ttl: number }
  | { kind: "nxdomain"; ttl: number }
  | { kind: "nodata"; ttl: number };

export interface MxRecord {
  exchange: string;
  priority: number;
  ttl: number;
}

export interface AddressRecord {
  address: string;
  ttl: number;
}

export interface CacheStats {
  /** Entries held now (expired ones are dropped lazily). */
  size: number;
  hits: number;
  misses: number;
  /** Lookups that joined an identical one already on the wire. */
  coalesced: number;
  /** Entries dropped because the cache was full. */
  evictions: number;
}

export interface ResolverOptions {
  /** "host[:port]" (IPv6 as "[::1]:53" or bare "::1"), port 53 by default; empty: the nameservers of /etc/resolv.conf. */
  servers?: string[];
  /** Per attempt. Default 2000. */
  timeoutMs?: number;
  /** Rounds through all servers. Default 2. */
  tries?: number;
  /** Default true. */
  cache?: boolean;
  /** Default 10000; the least recently used entry goes first. */
  maxCacheEntries?: number;
  /** Clamp for every TTL the cache applies. Defaults 0 and 86400. */
  minTtlSec?: number;
  maxTtlSec?: number;
  /** For NXDOMAIN/NODATA answers that carry no SOA. Default 60. */
  negativeTtlSec?: number;
}

export interface DnsResolver {
  /** Throws DnsError on temporary failures; an invalid name answers NXDOMAIN without asking anyone. */
  query<T extends RRType>(name: string, type: T): Promise<DnsAnswer<T>>;
  mx(domain: string): Promise<Lookup<MxRecord>>;
  a(name: string): Promise<Lookup<AddressRecord>>;
  aaaa(name: string): Promise<Lookup<AddressRecord>>;
  /** One entry per TXT record, holding its character-strings. */
  txt(name: string): Promise<Lookup<string[]>>;
  cacheStats(): CacheStats;
  clearCache(): void;
  /** The servers in the order they are tried, as "host:port". */
  readonly servers: readonly string[];
}
