import dgram from "node:dgram";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { type DnsServerHandle, startDnsServer } from "@mailpipe/testing";
import * as dnsPacket from "dns-packet";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  createResolver,
  DnsError,
  type DnsResolver,
  parseServer,
  parseServerList,
  type ResolverOptions,
  readResolvConf,
} from "./index.ts";

/** Each test uses its own names, so counting the server's log by name is exact. */
function asked(dns: DnsServerHandle, name: string, type?: string, transport?: "udp" | "tcp"): number {
  return dns.queries.filter(
    (q) => q.name === name && (!type || q.type === type) && (!transport || q.transport === transport),
  ).length;
}

/** A UDP "server" on loopback that answers nothing, counting what it receives. */
async function startSilentServer(): Promise<{
  address: string;
  received: () => number;
  stop: () => Promise<void>;
}> {
  const socket = dgram.createSocket("udp4");
  let received = 0;
  socket.on("message", () => received++);
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
  return {
    address: `127.0.0.1:${socket.address().port}`,
    received: () => received,
    stop: () => new Promise((resolve) => socket.close(() => resolve())),
  };
}

/** A loopback UDP port with nothing bound to it. */
async function closedPort(): Promise<string> {
  const socket = dgram.createSocket("udp4");
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
  const { port } = socket.address();
  await new Promise<void>((resolve) => socket.close(() => resolve()));
  return `127.0.0.1:${port}`;
}

function text(bytes: number, seed: string): string {
  return `v=DKIM1; k=rsa; p=${seed.repeat(Math.ceil(bytes / seed.length))}`.slice(0, bytes);
}

describe("createResolver against the test DNS server", () => {
  let dns: DnsServerHandle;
  const resolverFor = (options: ResolverOptions = {}): DnsResolver =>
    createResolver({ servers: [dns.address], timeoutMs: 1000, tries: 1, ...options });

  beforeAll(async () => {
    dns = await startDnsServer();
  });
  afterAll(() => dns.stop());

  it("answers A, AAAA, MX and TXT with the records and their TTLs", async () => {
    dns.set("basic.test", {
      A: ["127.0.0.2", "127.0.0.3"],
      AAAA: ["::1"],
      MX: [{ exchange: "mx.basic.test", priority: 10 }],
      TXT: ["v=spf1 -all", ["part one ", "part two"]],
      ttl: 300,
    });
    const r = resolverFor();
    expect(await r.a("basic.test")).toEqual({
      kind: "records",
      records: [
        { address: "127.0.0.2", ttl: 300 },
        { address: "127.0.0.3", ttl: 300 },
      ],
      ttl: 300,
    });
    expect(await r.aaaa("basic.test")).toEqual({
      kind: "records",
      records: [{ address: "::1", ttl: 300 }],
      ttl: 300,
    });
    expect(await r.mx("basic.test")).toEqual({
      kind: "records",
      records: [{ exchange: "mx.basic.test", priority: 10, ttl: 300 }],
      ttl: 300,
    });
    expect(await r.txt("basic.test")).toEqual({
      kind: "records",
      records: [["v=spf1 -all"], ["part one ", "part two"]],
      ttl: 300,
    });
    const answer = await r.query("basic.test", "A");
    expect(answer.rcode).toBe("NOERROR");
    expect(answer.answers[0]).toEqual({ type: "A", name: "basic.test", ttl: 300, address: "127.0.0.2" });
  });

  it("tells NXDOMAIN from NODATA", async () => {
    dns.set("only-a.test", { A: ["127.0.0.2"] });
    const r = resolverFor();
    expect(await r.mx("missing.test")).toMatchObject({ kind: "nxdomain" });
    expect(await r.txt("missing.test")).toMatchObject({ kind: "nxdomain" });
    expect(await r.query("missing.test", "A")).toMatchObject({ rcode: "NXDOMAIN", answers: [] });
    expect(await r.mx("only-a.test")).toMatchObject({ kind: "nodata" });
    expect(await r.query("only-a.test", "MX")).toMatchObject({ rcode: "NOERROR", answers: [] });
  });

  it("throws DnsError SERVFAIL naming the name, type and server", async () => {
    dns.set("servfail.test", { rcode: "SERVFAIL" });
    const error = await resolverFor()
      .query("servfail.test", "MX")
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(DnsError);
    expect(error).toMatchObject({
      code: "SERVFAIL",
      qname: "servfail.test",
      qtype: "MX",
      server: dns.address,
    });
    const message = (error as Error).message;
    expect(message).toContain("servfail.test");
    expect(message).toContain("MX");
    expect(message).toContain(dns.address);
  });

  it("throws DnsError REFUSED when the server refuses", async () => {
    dns.set("refused.test", { rcode: "REFUSED" });
    await expect(resolverFor().txt("refused.test")).rejects.toMatchObject({
      name: "DnsError",
      code: "REFUSED",
    });
  });

  it("throws DnsError TIMEOUT when the server never answers, rather than hanging", async () => {
    dns.set("silent.test", { timeout: true });
    const error = await resolverFor({ timeoutMs: 200, tries: 1 })
      .mx("silent.test")
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(DnsError);
    expect(error).toMatchObject({ code: "TIMEOUT", qname: "silent.test", qtype: "MX" });
    expect(asked(dns, "silent.test")).toBe(1);
  });

  it("asks `tries` times in all before giving up", async () => {
    dns.set("silent-tries.test", { timeout: true });
    await expect(resolverFor({ timeoutMs: 150, tries: 3 }).a("silent-tries.test")).rejects.toMatchObject({
      code: "TIMEOUT",
    });
    expect(asked(dns, "silent-tries.test")).toBe(3);
  });

  it("retries over TCP when the UDP answer is truncated, and gets the whole TXT record", async () => {
    const key = text(2000, "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A");
    dns.set("big._domainkey.tcp.test", { TXT: [key] });
    const result = await resolverFor().txt("big._domainkey.tcp.test");
    expect(result.kind).toBe("records");
    if (result.kind !== "records") return;
    expect(result.records).toHaveLength(1);
    expect(result.records[0]!.length).toBeGreaterThan(1); // split into 255-byte character-strings
    expect(result.records[0]!.join("")).toBe(key);
    expect(asked(dns, "big._domainkey.tcp.test", "TXT", "udp")).toBe(1);
    expect(asked(dns, "big._domainkey.tcp.test", "TXT", "tcp")).toBe(1);
  });

  it("offers EDNS0, so an answer over 512 bytes still fits in one UDP datagram", async () => {
    const key = text(900, "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQ");
    dns.set("mid._domainkey.edns.test", { TXT: [key] });
    const result = await resolverFor().txt("mid._domainkey.edns.test");
    expect(result).toMatchObject({ kind: "records" });
    if (result.kind === "records") expect(result.records[0]!.join("")).toBe(key);
    expect(asked(dns, "mid._domainkey.edns.test", "TXT", "udp")).toBe(1);
    expect(asked(dns, "mid._domainkey.edns.test", "TXT", "tcp")).toBe(0);
  });

  it("follows CNAME chains to the records of the asked type, with the smallest TTL on the way", async () => {
    dns.set("www.cname.test", { CNAME: "edge.cname.test", ttl: 30 });
    dns.set("edge.cname.test", { CNAME: "host.cname.test", ttl: 300 });
    dns.set("host.cname.test", {
      A: ["127.0.0.9"],
      MX: [{ exchange: "mx.cname.test", priority: 5 }],
      ttl: 100,
    });
    const r = resolverFor();
    const a = await r.query("www.cname.test", "A");
    expect(a.rcode).toBe("NOERROR");
    expect(a.answers).toEqual([{ type: "A", name: "host.cname.test", ttl: 100, address: "127.0.0.9" }]);
    expect(a.ttl).toBe(30);
    expect(await r.mx("www.cname.test")).toMatchObject({
      kind: "records",
      records: [{ exchange: "mx.cname.test" }],
    });
    // asking for the CNAME itself returns it, not what it points to
    const cname = await r.query("www.cname.test", "CNAME");
    expect(cname.answers).toEqual([
      { type: "CNAME", name: "www.cname.test", ttl: 30, target: "edge.cname.test" },
    ]);
  });

  it("asks for a CNAME target itself when the server did not include it", async () => {
    // the test server only follows CNAMEs to names it serves, like an authoritative server
    dns.set("alias.dangling.test", { CNAME: "elsewhere.other.test" });
    const r = resolverFor();
    expect(await r.a("alias.dangling.test")).toMatchObject({ kind: "nxdomain" });
    expect(asked(dns, "elsewhere.other.test", "A")).toBe(1);
    dns.set("elsewhere.other.test", { A: ["127.0.0.7"] });
    r.clearCache();
    expect(await r.a("alias.dangling.test")).toMatchObject({
      kind: "records",
      records: [{ address: "127.0.0.7" }],
    });
  });

  it("fails a CNAME loop with SERVFAIL instead of looping", async () => {
    dns.set("ping.loop.test", { CNAME: "pong.loop.test" });
    dns.set("pong.loop.test", { CNAME: "ping.loop.test" });
    await expect(resolverFor().a("ping.loop.test")).rejects.toMatchObject({ code: "SERVFAIL" });
  });

  it("uses the second server when the first does not answer", async () => {
    dns.set("failover.test", { A: ["127.0.0.5"] });
    const silent = await startSilentServer();
    try {
      const r = createResolver({ servers: [silent.address, dns.address], timeoutMs: 200, tries: 1 });
      expect(await r.a("failover.test")).toMatchObject({
        kind: "records",
        records: [{ address: "127.0.0.5" }],
      });
      expect(silent.received()).toBe(1);
      expect(asked(dns, "failover.test")).toBe(1);
    } finally {
      await silent.stop();
    }
  });

  it("moves on at once from a server whose port is closed", async () => {
    dns.set("closed-port.test", { A: ["127.0.0.6"] });
    const r = createResolver({ servers: [await closedPort(), dns.address], timeoutMs: 1000, tries: 1 });
    expect(await r.a("closed-port.test")).toMatchObject({
      kind: "records",
      records: [{ address: "127.0.0.6" }],
    });
  });

  it("reports a server that refuses connections as NETWORK", async () => {
    const r = createResolver({ servers: [await closedPort()], timeoutMs: 1000, tries: 2 });
    await expect(r.a("nowhere.test")).rejects.toMatchObject({ name: "DnsError", code: "NETWORK" });
  });

  it("serves a repeated question from the cache until its TTL runs out", async () => {
    dns.set("ttl60.test", { A: ["127.0.0.2"], ttl: 60 });
    dns.set("ttl1.test", { A: ["127.0.0.3"], ttl: 1 });
    const r = resolverFor();
    await r.a("ttl60.test");
    await r.a("ttl1.test");
    await sleep(1200);
    const again = await r.a("ttl60.test");
    expect(asked(dns, "ttl60.test")).toBe(1);
    // the cache hands out what is left of the TTL, not the original
    expect(again.ttl).toBeLessThan(60);
    expect(again.ttl).toBeGreaterThan(50);
    await r.a("ttl1.test");
    expect(asked(dns, "ttl1.test")).toBe(2);
    expect(r.cacheStats()).toMatchObject({ hits: 1, misses: 3 });
  });

  it("keys the cache by name without case or trailing dot, and by type", async () => {
    dns.set("case.test", { A: ["127.0.0.2"], MX: [{ exchange: "mx.case.test", priority: 1 }] });
    const r = resolverFor();
    await r.a("Case.TEST");
    await r.a("case.test.");
    expect(asked(dns, "case.test", "A")).toBe(1);
    await r.mx("case.test");
    expect(asked(dns, "case.test", "MX")).toBe(1);
  });

  it("caches NXDOMAIN and NODATA for negativeTtlSec when there is no SOA", async () => {
    dns.set("nodata-cache.test", { A: ["127.0.0.2"] });
    const r = resolverFor({ negativeTtlSec: 1 });
    const first = await r.mx("nx-cache.test");
    expect(first).toEqual({ kind: "nxdomain", ttl: 1 });
    await r.mx("nx-cache.test");
    await r.mx("nodata-cache.test");
    await r.mx("nodata-cache.test");
    expect(asked(dns, "nx-cache.test")).toBe(1);
    expect(asked(dns, "nodata-cache.test", "MX")).toBe(1);
    await sleep(1200);
    await r.mx("nx-cache.test");
    expect(asked(dns, "nx-cache.test")).toBe(2);
  });

  it("never caches SERVFAIL or timeouts", async () => {
    dns.set("servfail-twice.test", { rcode: "SERVFAIL" });
    const r = resolverFor();
    await expect(r.a("servfail-twice.test")).rejects.toBeInstanceOf(DnsError);
    await expect(r.a("servfail-twice.test")).rejects.toBeInstanceOf(DnsError);
    expect(asked(dns, "servfail-twice.test")).toBe(2);
    // once the server recovers, the answer is there at once
    dns.set("servfail-twice.test", { A: ["127.0.0.4"] });
    expect(await r.a("servfail-twice.test")).toMatchObject({ kind: "records" });
  });

  it("sends one packet for 100 concurrent identical lookups", async () => {
    dns.set("coalesce.test", { A: ["127.0.0.8"] });
    const r = resolverFor();
    const results = await Promise.all(Array.from({ length: 100 }, () => r.a("coalesce.test")));
    expect(asked(dns, "coalesce.test")).toBe(1);
    for (const result of results)
      expect(result).toMatchObject({ kind: "records", records: [{ address: "127.0.0.8" }] });
    expect(r.cacheStats()).toMatchObject({ misses: 1, coalesced: 99 });
  });

  it("shares one failure among coalesced lookups, and does not keep it", async () => {
    dns.set("coalesce-fail.test", { rcode: "SERVFAIL" });
    const r = resolverFor();
    const settled = await Promise.allSettled(Array.from({ length: 10 }, () => r.a("coalesce-fail.test")));
    expect(settled.every((s) => s.status === "rejected" && (s.reason as DnsError).code === "SERVFAIL")).toBe(
      true,
    );
    expect(asked(dns, "coalesce-fail.test")).toBe(1);
    await expect(r.a("coalesce-fail.test")).rejects.toBeInstanceOf(DnsError);
    expect(asked(dns, "coalesce-fail.test")).toBe(2);
  });

  it("clearCache() forgets, cache: false never remembers", async () => {
    dns.set("clear.test", { A: ["127.0.0.2"] });
    const r = resolverFor();
    await r.a("clear.test");
    expect(r.cacheStats().size).toBe(1);
    r.clearCache();
    expect(r.cacheStats().size).toBe(0);
    await r.a("clear.test");
    expect(asked(dns, "clear.test")).toBe(2);

    dns.set("nocache.test", { A: ["127.0.0.2"] });
    const uncached = resolverFor({ cache: false });
    await uncached.a("nocache.test");
    await uncached.a("nocache.test");
    expect(asked(dns, "nocache.test")).toBe(2);
  });

  it("drops the least recently used entry when the cache is full", async () => {
    for (const n of ["lru1", "lru2", "lru3"]) dns.set(`${n}.test`, { A: ["127.0.0.2"] });
    const r = resolverFor({ maxCacheEntries: 2 });
    await r.a("lru1.test");
    await r.a("lru2.test");
    await r.a("lru1.test"); // lru1 is now the most recently used
    await r.a("lru3.test"); // evicts lru2
    expect(r.cacheStats()).toMatchObject({ size: 2, evictions: 1 });
    await r.a("lru1.test");
    await r.a("lru2.test");
    expect(asked(dns, "lru1.test")).toBe(1);
    expect(asked(dns, "lru2.test")).toBe(2);
  });

  it("clamps TTLs to minTtlSec and maxTtlSec", async () => {
    dns.set("short.clamp.test", { A: ["127.0.0.2"], ttl: 1 });
    dns.set("long.clamp.test", { A: ["127.0.0.2"], ttl: 1_000_000 });
    const r = resolverFor({ minTtlSec: 30, maxTtlSec: 3600 });
    expect((await r.a("short.clamp.test")).ttl).toBe(30);
    expect((await r.a("long.clamp.test")).ttl).toBe(3600);
  });

  it("answers NXDOMAIN for a name that cannot exist, without asking", async () => {
    const r = resolverFor();
    const before = dns.queries.length;
    expect(await r.query(`${"a".repeat(64)}.test`, "A")).toMatchObject({ rcode: "NXDOMAIN" });
    expect(await r.query("a..test", "MX")).toMatchObject({ rcode: "NXDOMAIN" });
    expect(await r.query("", "TXT")).toMatchObject({ rcode: "NXDOMAIN" });
    expect(dns.queries.length).toBe(before);
  });

  it("answers PTR queries", async () => {
    dns.set("9.0.0.127.in-addr.arpa", { PTR: ["Host.PTR.test."] });
    const answer = await resolverFor().query("9.0.0.127.in-addr.arpa", "PTR");
    expect(answer.answers).toEqual([
      { type: "PTR", name: "9.0.0.127.in-addr.arpa", ttl: 60, target: "host.ptr.test" },
    ]);
  });

  it("answers TLSA queries, and says whether the server set AD (validated) on the answer", async () => {
    const secure = await startDnsServer({ secureZones: ["signed.test"] });
    try {
      const data = Buffer.from("a1b2c3", "hex");
      for (const zone of ["signed.test", "unsigned.test"]) {
        secure.set(`_25._tcp.mx.${zone}`, { TLSA: [{ usage: 3, selector: 1, matchingType: 1, data }] });
      }
      const r = createResolver({ servers: [secure.address], timeoutMs: 1000, tries: 1 });
      const signed = await r.query("_25._tcp.mx.signed.test", "TLSA");
      expect(signed.authenticated).toBe(true);
      expect(signed.answers).toEqual([
        {
          type: "TLSA",
          name: "_25._tcp.mx.signed.test",
          ttl: 60,
          usage: 3,
          selector: 1,
          matchingType: 1,
          data,
        },
      ]);
      expect((await r.query("_25._tcp.mx.unsigned.test", "TLSA")).authenticated).toBe(false);
      // a negative answer in a signed zone is authenticated too (authenticated denial)
      expect(await r.query("none.signed.test", "A")).toMatchObject({
        rcode: "NXDOMAIN",
        authenticated: true,
      });
      // and from the cache, the flag stays
      expect((await r.query("_25._tcp.mx.signed.test", "TLSA")).authenticated).toBe(true);
    } finally {
      await secure.stop();
    }
  });
});

describe("the wire protocol", () => {
  /** A scripted UDP server: `reply` gets each query and returns the datagrams to send back. */
  async function startScriptedServer(reply: (query: dnsPacket.DecodedPacket) => dnsPacket.Packet[]) {
    const socket = dgram.createSocket("udp4");
    const seen: { id: number; port: number; query: dnsPacket.DecodedPacket }[] = [];
    socket.on("message", (message, remote) => {
      const query = dnsPacket.decode(message);
      seen.push({ id: query.id ?? -1, port: remote.port, query });
      for (const packet of reply(query)) socket.send(dnsPacket.encode(packet), remote.port, remote.address);
    });
    await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
    return {
      address: `127.0.0.1:${socket.address().port}`,
      seen,
      stop: () => new Promise<void>((resolve) => socket.close(() => resolve())),
    };
  }

  const answerA = (
    query: dnsPacket.DecodedPacket,
    address: string,
    override: Partial<dnsPacket.Packet> = {},
  ) => ({
    type: "response" as const,
    id: query.id,
    flags: dnsPacket.RECURSION_DESIRED | dnsPacket.RECURSION_AVAILABLE,
    questions: query.questions,
    answers: [{ type: "A" as const, name: query.questions![0]!.name, ttl: 60, data: address }],
    ...override,
  });

  it("ignores answers with the wrong id or question, and takes the real one", async () => {
    const server = await startScriptedServer((query) => [
      answerA(query, "10.6.6.6", { id: ((query.id ?? 0) + 1) % 0x10000 }),
      answerA(query, "10.6.6.7", { questions: [{ type: "A", name: "other.test", class: "IN" }] }),
      answerA(query, "10.6.6.8", {
        questions: [{ type: "AAAA", name: query.questions![0]!.name, class: "IN" }],
      }),
      answerA(query, "127.0.0.2"),
    ]);
    try {
      const r = createResolver({ servers: [server.address], timeoutMs: 1000, tries: 1 });
      expect(await r.a("spoof.test")).toMatchObject({ kind: "records", records: [{ address: "127.0.0.2" }] });
    } finally {
      await server.stop();
    }
  });

  it("uses a random id and source port per query, with EDNS0 at 1232 bytes and RD set", async () => {
    const server = await startScriptedServer((query) => [answerA(query, "127.0.0.2")]);
    try {
      const r = createResolver({ servers: [server.address], cache: false, timeoutMs: 1000, tries: 1 });
      for (let i = 0; i < 10; i++) await r.a("random.test");
      expect(server.seen).toHaveLength(10);
      expect(new Set(server.seen.map((s) => s.id)).size).toBeGreaterThan(1);
      expect(new Set(server.seen.map((s) => s.port)).size).toBeGreaterThan(1);
      const first = server.seen[0]!.query;
      const opt = first.additionals?.find((rr) => rr.type === "OPT") as dnsPacket.OptAnswer | undefined;
      expect(opt?.udpPayloadSize).toBe(1232);
      expect(first.flag_rd).toBe(true);
      // AD in the query: a validating resolver then says whether it validated (RFC 6840 5.7)
      expect(first.flag_ad).toBe(true);
      expect(first.questions).toEqual([{ name: "random.test", type: "A", class: "IN" }]);
    } finally {
      await server.stop();
    }
  });

  it("caches a negative answer for the SOA minimum when the server sends one", async () => {
    const soa = (query: dnsPacket.DecodedPacket, minimum: number): dnsPacket.Packet => ({
      type: "response",
      id: query.id,
      flags: dnsPacket.RECURSION_AVAILABLE | 3, // NXDOMAIN
      questions: query.questions,
      authorities: [
        {
          type: "SOA",
          name: "test",
          ttl: 3600,
          data: {
            mname: "ns.test",
            rname: "hostmaster.test",
            serial: 1,
            refresh: 3600,
            retry: 600,
            expire: 86400,
            minimum,
          },
        },
      ],
    });
    const server = await startScriptedServer((query) => [soa(query, 120)]);
    try {
      const r = createResolver({ servers: [server.address], timeoutMs: 1000, tries: 1, negativeTtlSec: 5 });
      expect(await r.mx("gone.test")).toEqual({ kind: "nxdomain", ttl: 120 });
    } finally {
      await server.stop();
    }
  });

  it("asks again without EDNS0 when the server answers FORMERR to it", async () => {
    const server = await startScriptedServer((query) => {
      const hasOpt = query.additionals?.some((rr) => rr.type === "OPT");
      if (hasOpt) return [{ type: "response", id: query.id, flags: 1, questions: query.questions }];
      return [answerA(query, "127.0.0.2")];
    });
    try {
      const r = createResolver({ servers: [server.address], timeoutMs: 1000, tries: 1 });
      expect(await r.a("old-server.test")).toMatchObject({
        kind: "records",
        records: [{ address: "127.0.0.2" }],
      });
      expect(server.seen).toHaveLength(2);
    } finally {
      await server.stop();
    }
  });
});

describe("server configuration", () => {
  it("parses host[:port] entries, IPv6 included", () => {
    expect(parseServer("10.0.0.2")).toEqual({ host: "10.0.0.2", port: 53, label: "10.0.0.2:53" });
    expect(parseServer("127.0.0.1:5353")).toEqual({ host: "127.0.0.1", port: 5353, label: "127.0.0.1:5353" });
    expect(parseServer("[::1]:5300")).toEqual({ host: "::1", port: 5300, label: "[::1]:5300" });
    expect(parseServer("2001:db8::53")).toEqual({
      host: "2001:db8::53",
      port: 53,
      label: "[2001:db8::53]:53",
    });
    expect(parseServer("coredns:1053")).toMatchObject({ host: "coredns", port: 1053 });
    expect(() => parseServer("127.0.0.1:99999")).toThrow(/invalid DNS server/);
    expect(() => parseServer("127.0.0.1:x")).toThrow(/invalid DNS server/);
    expect(() => parseServer("")).toThrow(/invalid DNS server/);
  });

  it("splits a DNS_SERVERS value on commas and spaces", () => {
    expect(parseServerList("127.0.0.1:5353, 10.0.0.2  [::1]:53")).toEqual([
      "127.0.0.1:5353",
      "10.0.0.2",
      "[::1]:53",
    ]);
    expect(() => parseServerList("127.0.0.1, bad:port")).toThrow(/invalid DNS server/);
  });

  it("reads the nameservers of resolv.conf, and falls back to 127.0.0.1", () => {
    const dir = mkdtempSync(join(tmpdir(), "dns-resolv-"));
    const file = join(dir, "resolv.conf");
    writeFileSync(
      file,
      "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver ::1\noptions ndots:5\n",
    );
    expect(readResolvConf(file)).toEqual(["10.0.0.2", "::1"]);
    expect(readResolvConf(join(dir, "missing"))).toEqual(["127.0.0.1"]);
    const r = createResolver({ servers: [] });
    expect(r.servers.length).toBeGreaterThan(0);
  });
});
