// The `resolver` option of mailauth (SPF, DKIM, DMARC, ARC, BIMI): node's dns.promises.resolve, on our cache.
import net from "node:net";
import { DnsError, type DnsErrorCode, type DnsResolver, isRRType, type RRType } from "./types.ts";

/** What node's dns.promises.resolve(name, rrtype) resolves with, per type. */
export type MailauthAnswer =
  | string[][] // TXT
  | { exchange: string; priority: number }[] // MX
  | string[] // A, AAAA, PTR, CNAME
  | { certUsage: number; selector: number; match: number; data: ArrayBuffer }[]; // TLSA

export type MailauthResolverFn = (name: string, rrtype: string) => Promise<MailauthAnswer>;

/** node's error codes (dns.NOTFOUND, dns.NODATA, ...); mailauth reads ENOTFOUND/ENODATA as "no record", the rest as temperror. */
const NODE_CODES: Record<DnsErrorCode, string> = {
  SERVFAIL: "ESERVFAIL",
  TIMEOUT: "ETIMEOUT",
  REFUSED: "EREFUSED",
  FORMERR: "EFORMERR",
  NETWORK: "ECONNREFUSED",
};

const SYSCALLS: Record<RRType, string> = {
  A: "queryA",
  AAAA: "queryAaaa",
  MX: "queryMx",
  TXT: "queryTxt",
  PTR: "queryPtr",
  CNAME: "queryCname",
  TLSA: "queryTlsa",
};

export interface NodeDnsError extends Error {
  code: string;
  syscall: string;
  hostname: string;
}

/** An error shaped like node's: `queryTxt ENOTFOUND example.com`, with code, syscall and hostname. */
function nodeError(code: string, syscall: string, hostname: string, cause?: unknown): NodeDnsError {
  // "no such record" is an answer, thrown for every SPF/DMARC miss: a stack trace would only cost
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    const err = new Error(`${syscall} ${code} ${hostname}`, cause === undefined ? undefined : { cause });
    return Object.assign(err, { code, syscall, hostname });
  } finally {
    Error.stackTraceLimit = limit;
  }
}

/** The PTR owner name of an IP address: 127.0.0.2 -> 2.0.0.127.in-addr.arpa. */
export function reverseName(ip: string): string {
  if (net.isIPv4(ip)) return `${ip.split(".").reverse().join(".")}.in-addr.arpa`;
  if (!net.isIPv6(ip)) throw new TypeError(`not an IP address: ${ip}`);
  const [head = "", tail = ""] = ip.includes("::") ? ip.split("::") : [ip, ""];
  const headGroups = head ? head.split(":") : [];
  const tailGroups = tail ? tail.split(":") : [];
  const zeros = Array<string>(8 - headGroups.length - tailGroups.length).fill("0");
  const hex = [...headGroups, ...zeros, ...tailGroups].map((g) => g.padStart(4, "0")).join("");
  return `${[...hex].reverse().join(".")}.ip6.arpa`;
}

/**
 * `resolver` for mailauth: resolves like node's dns.promises.resolve(name, rrtype) (TXT -> string[][],
 * MX -> {exchange, priority}[], A/AAAA -> string[]), and rejects like it: ENOTFOUND for NXDOMAIN,
 * ENODATA for NODATA, ESERVFAIL/ETIMEOUT/EREFUSED/EFORMERR/ECONNREFUSED for temporary failures.
 * For PTR an IP address is accepted as well as its reverse name.
 */
export function mailauthResolver(resolver: DnsResolver): MailauthResolverFn {
  return async (name, rrtype) => {
    const type = String(rrtype).toUpperCase();
    if (!isRRType(type)) throw nodeError("ENOTIMP", `query${rrtype}`, name);
    const syscall = SYSCALLS[type];
    const qname = type === "PTR" && net.isIP(name) ? reverseName(name) : name;
    let answer: Awaited<ReturnType<DnsResolver["query"]>>;
    try {
      answer = await resolver.query(qname, type);
    } catch (err) {
      if (err instanceof DnsError) throw nodeError(NODE_CODES[err.code], syscall, name, err);
      throw err;
    }
    if (answer.rcode === "NXDOMAIN") throw nodeError("ENOTFOUND", syscall, name);
    if (answer.answers.length === 0) throw nodeError("ENODATA", syscall, name);
    const out: unknown[] = [];
    for (const r of answer.answers) {
      switch (r.type) {
        case "TXT":
          out.push(r.strings);
          break;
        case "MX":
          out.push({ exchange: r.exchange, priority: r.priority });
          break;
        case "A":
        case "AAAA":
          out.push(r.address);
          break;
        case "PTR":
        case "CNAME":
          out.push(r.target);
          break;
        case "TLSA": {
          const data = r.data.buffer.slice(
            r.data.byteOffset,
            r.data.byteOffset + r.data.byteLength,
          ) as ArrayBuffer;
          out.push({ certUsage: r.usage, selector: r.selector, match: r.matchingType, data });
          break;
        }
      }
    }
    return out as MailauthAnswer;
  };
}
