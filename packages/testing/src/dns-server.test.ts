import dgram from "node:dgram";
import { Resolver } from "node:dns/promises";
import * as dnsPacket from "dns-packet";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DnsServerHandle, reverseName, startDnsServer } from "./dns-server.ts";

const DKIM_KEY = `v=DKIM1; k=rsa; p=${"MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA".repeat(8)}`;

describe("startDnsServer", () => {
  let dns: DnsServerHandle;
  let resolver: Resolver;

  beforeAll(async () => {
    dns = await startDnsServer({
      records: {
        "example.test": {
          MX: [
            { exchange: "mx2.example.test", priority: 20 },
            { exchange: "mx1.example.test.", priority: 10 },
          ],
          TXT: ["v=spf1 ip4:127.0.0.0/8 -all"],
        },
        "sel._domainkey.example.test": { TXT: [DKIM_KEY] },
        "mx1.example.test": { A: ["127.0.0.2"], AAAA: ["::1"] },
        "mail.example.test": { CNAME: "mx1.example.test" },
        "broken.test": { rcode: "SERVFAIL" },
        "refused.test": { rcode: "REFUSED" },
        "slow.test": { timeout: true },
        // 40 A records do not fit in 512 bytes: the answer must come over TCP.
        "many.test": { A: Array.from({ length: 40 }, (_, i) => `127.0.1.${i + 1}`) },
        [reverseName("127.0.0.2")]: { PTR: ["mx1.example.test"] },
      },
    });
    resolver = new Resolver({ timeout: 300, tries: 1 });
    resolver.setServers([dns.address]);
  });

  afterAll(() => dns.stop());

  it("gives an address usable as a DNS_SERVERS entry", () => {
    expect(dns.address).toBe(`127.0.0.1:${dns.port}`);
    expect(dns.port).toBeGreaterThan(0);
  });

  it("resolves MX records with their priorities", async () => {
    const mx = await resolver.resolveMx("example.test");
    expect(
      mx.map(({ exchange, priority }) => ({ exchange, priority })).sort((a, b) => a.priority - b.priority),
    ).toEqual([
      { exchange: "mx1.example.test", priority: 10 },
      { exchange: "mx2.example.test", priority: 20 },
    ]);
  });

  it("resolves TXT, joining a record longer than 255 bytes back together", async () => {
    expect(await resolver.resolveTxt("example.test")).toEqual([["v=spf1 ip4:127.0.0.0/8 -all"]]);
    const dkim = await resolver.resolveTxt("sel._domainkey.example.test");
    expect(DKIM_KEY.length).toBeGreaterThan(255);
    expect(dkim).toHaveLength(1);
    expect(dkim[0]!.length).toBeGreaterThan(1); // it really was split into character-strings
    expect(dkim[0]!.join("")).toBe(DKIM_KEY);
  });

  it("resolves A and AAAA", async () => {
    expect(await resolver.resolve4("mx1.example.test")).toEqual(["127.0.0.2"]);
    expect(await resolver.resolve6("mx1.example.test")).toEqual(["::1"]);
  });

  it("matches names case-insensitively and ignores a trailing dot", async () => {
    expect(await resolver.resolve4("MX1.Example.TEST.")).toEqual(["127.0.0.2"]);
  });

  it("follows a CNAME to a known target", async () => {
    expect(await resolver.resolve4("mail.example.test")).toEqual(["127.0.0.2"]);
    expect(await resolver.resolveCname("mail.example.test")).toEqual(["mx1.example.test"]);
  });

  it("answers PTR queries for reverse names", async () => {
    expect(await resolver.reverse("127.0.0.2")).toEqual(["mx1.example.test"]);
  });

  it("answers NXDOMAIN for unknown names (ENOTFOUND)", async () => {
    await expect(resolver.resolveMx("nowhere.test")).rejects.toMatchObject({ code: "ENOTFOUND" });
  });

  it("answers NODATA for a known name without the type (ENODATA)", async () => {
    await expect(resolver.resolveMx("mx1.example.test")).rejects.toMatchObject({ code: "ENODATA" });
  });

  it("answers SERVFAIL and REFUSED when scripted", async () => {
    await expect(resolver.resolveMx("broken.test")).rejects.toMatchObject({ code: "ESERVFAIL" });
    await expect(resolver.resolve4("refused.test")).rejects.toMatchObject({ code: "EREFUSED" });
  });

  it("never answers a name scripted to time out (ETIMEOUT)", async () => {
    const started = Date.now();
    await expect(resolver.resolveMx("slow.test")).rejects.toMatchObject({ code: "ETIMEOUT" });
    expect(Date.now() - started).toBeGreaterThanOrEqual(250);
  });

  it("truncates large UDP answers so the resolver retries over TCP", async () => {
    const before = dns.queries.length;
    const addresses = await resolver.resolve4("many.test");
    expect(addresses).toHaveLength(40);
    const asked = dns.queries.slice(before).filter((q) => q.name === "many.test");
    expect(asked.map((q) => q.transport)).toEqual(["udp", "tcp"]);
  });

  it("sets TC and drops the answers on UDP beyond the client's EDNS0 size", async () => {
    const ask = (additionals: dnsPacket.Answer[]) =>
      udpQuery(dns.port, {
        type: "query",
        id: 7,
        questions: [{ type: "A", name: "many.test" }],
        additionals,
      });
    const plain = await ask([]);
    expect(plain.flag_tc).toBe(true);
    expect(plain.answers).toHaveLength(0);
    const edns = await ask([{ type: "OPT", name: ".", udpPayloadSize: 4096 } as dnsPacket.OptAnswer]);
    expect(edns.flag_tc).toBe(false);
    expect(edns.answers).toHaveLength(40);
    expect(edns.flag_aa).toBe(true);
  });

  it("records every query with its name and type", async () => {
    await resolver.resolveTxt("example.test");
    expect(dns.queries.at(-1)).toMatchObject({ name: "example.test", type: "TXT", transport: "udp" });
    expect(dns.queries.at(-1)?.at).toBeInstanceOf(Date);
  });

  it("changes records at run time with set, remove and clear", async () => {
    const other = await startDnsServer();
    const r = new Resolver({ timeout: 300, tries: 1 });
    r.setServers([other.address]);
    try {
      await expect(r.resolve4("dyn.test")).rejects.toMatchObject({ code: "ENOTFOUND" });
      other.set("dyn.test", { A: ["127.0.0.9"], ttl: 5 });
      expect(await r.resolve4("dyn.test", { ttl: true })).toEqual([{ address: "127.0.0.9", ttl: 5 }]);
      other.set("dyn.test", { A: ["127.0.0.10"] });
      expect(await r.resolve4("dyn.test")).toEqual(["127.0.0.10"]);
      other.remove("dyn.test");
      await expect(r.resolve4("dyn.test")).rejects.toMatchObject({ code: "ENOTFOUND" });
      other.set("a.test", { A: ["127.0.0.1"] });
      other.clear();
      await expect(r.resolve4("a.test")).rejects.toMatchObject({ code: "ENOTFOUND" });
    } finally {
      await other.stop();
    }
  });
});

describe("startDnsServer with forward", () => {
  let upstream: DnsServerHandle;
  let silent: DnsServerHandle;
  let dns: DnsServerHandle;
  let resolver: Resolver;

  beforeAll(async () => {
    upstream = await startDnsServer({
      records: {
        "remote.test": { MX: [{ exchange: "mx1.remote.test", priority: 10 }], ttl: 1234 },
        "mx1.remote.test": { A: ["127.0.0.2"], ttl: 77 },
        "many.remote.test": { A: Array.from({ length: 40 }, (_, i) => `127.0.2.${i + 1}`) },
        "broken.remote.test": { rcode: "SERVFAIL" },
      },
    });
    // an upstream that receives every question and answers none
    silent = await startDnsServer({ records: { "remote.test": { timeout: true } } });
    dns = await startDnsServer({
      records: { "example.test": { A: ["127.0.0.1"] } },
      forward: { servers: [upstream.address], localZones: ["example.test", "invalid"], timeoutMs: 600 },
    });
    resolver = new Resolver({ timeout: 2000, tries: 1 });
    resolver.setServers([dns.address]);
  });

  afterAll(() => Promise.all([dns.stop(), upstream.stop(), silent.stop()]));

  it("relays what the upstream answers for names it does not hold, TTLs kept", async () => {
    expect(await resolver.resolveMx("remote.test")).toMatchObject([
      { exchange: "mx1.remote.test", priority: 10 },
    ]);
    expect(await resolver.resolve4("mx1.remote.test", { ttl: true })).toEqual([
      { address: "127.0.0.2", ttl: 77 },
    ]);
    const asked = new Resolver({ timeout: 2000, tries: 1 });
    asked.setServers([dns.address]);
    expect(await asked.resolve4("example.test")).toEqual(["127.0.0.1"]);
    expect(upstream.queries.map((q) => q.name)).toEqual(["remote.test", "mx1.remote.test"]);
  });

  it("relays the upstream's NXDOMAIN and SERVFAIL as they are", async () => {
    await expect(resolver.resolve4("nowhere.remote.test")).rejects.toMatchObject({ code: "ENOTFOUND" });
    await expect(resolver.resolve4("broken.remote.test")).rejects.toMatchObject({ code: "ESERVFAIL" });
    expect(upstream.queries.some((q) => q.name === "nowhere.remote.test")).toBe(true);
  });

  it("answers names under its local zones itself, never asking upstream", async () => {
    const before = upstream.queries.length;
    await expect(resolver.resolve4("other.example.test")).rejects.toMatchObject({ code: "ENOTFOUND" });
    await expect(resolver.resolve4("someone.invalid")).rejects.toMatchObject({ code: "ENOTFOUND" });
    expect(upstream.queries.slice(before)).toEqual([]);
  });

  it("asks upstream over TCP when its UDP answer is truncated, and the client too", async () => {
    const before = upstream.queries.length;
    expect(await resolver.resolve4("many.remote.test")).toHaveLength(40);
    const toUpstream = upstream.queries.slice(before).filter((q) => q.name === "many.remote.test");
    expect(toUpstream.map((q) => q.transport)).toContain("tcp");
    const fromClient = dns.queries.filter((q) => q.name === "many.remote.test");
    expect(fromClient.map((q) => q.transport)).toEqual(["udp", "tcp"]);
  });

  it("answers SERVFAIL when no upstream answers in time, a temporary failure", async () => {
    const lost = await startDnsServer({
      forward: { servers: [silent.address], timeoutMs: 300 },
    });
    const r = new Resolver({ timeout: 2000, tries: 1 });
    r.setServers([lost.address]);
    try {
      await expect(r.resolveMx("remote.test")).rejects.toMatchObject({ code: "ESERVFAIL" });
      expect(silent.queries.map((q) => q.name)).toContain("remote.test");
    } finally {
      await lost.stop();
    }
  });

  it("moves on to the next upstream when the first is silent", async () => {
    const two = await startDnsServer({
      forward: { servers: [silent.address, upstream.address], timeoutMs: 1000 },
    });
    const r = new Resolver({ timeout: 2000, tries: 1 });
    r.setServers([two.address]);
    try {
      expect(await r.resolveMx("remote.test")).toMatchObject([{ exchange: "mx1.remote.test", priority: 10 }]);
    } finally {
      await two.stop();
    }
  });
});

describe("reverseName", () => {
  it("builds in-addr.arpa and ip6.arpa names", () => {
    expect(reverseName("127.0.0.2")).toBe("2.0.0.127.in-addr.arpa");
    expect(reverseName("2001:db8::1")).toBe(
      "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
    );
    expect(() => reverseName("mx.test")).toThrow(/not an IP/);
  });
});

function udpQuery(port: number, packet: dnsPacket.Packet): Promise<dnsPacket.DecodedPacket> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket("udp4");
    const timer = setTimeout(() => {
      socket.close();
      reject(new Error("no DNS answer within 2 s"));
    }, 2_000);
    socket.once("message", (message) => {
      clearTimeout(timer);
      socket.close();
      resolve(dnsPacket.decode(message));
    });
    socket.send(dnsPacket.encode(packet), port, "127.0.0.1");
  });
}
