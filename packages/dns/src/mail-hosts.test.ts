import { type DnsServerHandle, startDnsServer } from "@mailpipe/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createResolver, type DnsResolver, type MailHosts, resolveMailHosts } from "./index.ts";

function exchanges(result: MailHosts): string[] {
  if (result.kind !== "hosts") throw new Error(`expected hosts, got ${result.kind}`);
  return result.hosts.map((h) => h.exchange);
}

describe("resolveMailHosts", () => {
  let dns: DnsServerHandle;
  let resolver: DnsResolver;

  beforeAll(async () => {
    dns = await startDnsServer({
      records: {
        "ordered.test": {
          MX: [
            { exchange: "mx20.ordered.test", priority: 20 },
            { exchange: "mx10.ordered.test", priority: 10 },
            { exchange: "mx30.ordered.test", priority: 30 },
          ],
          ttl: 600,
        },
        "mx10.ordered.test": { A: ["127.0.0.10"], AAAA: ["::10"], ttl: 120 },
        "mx20.ordered.test": { AAAA: ["::20"], A: ["127.0.0.20"] },
        "mx30.ordered.test": { A: ["127.0.0.30"] },

        "equal.test": {
          MX: [
            { exchange: "b.equal.test", priority: 10 },
            { exchange: "a.equal.test", priority: 10 },
            { exchange: "backup.equal.test", priority: 50 },
          ],
        },
        "a.equal.test": { A: ["127.0.0.11"] },
        "b.equal.test": { A: ["127.0.0.12"] },
        "backup.equal.test": { A: ["127.0.0.13"] },

        "implicit.test": { A: ["127.0.0.40"], AAAA: ["::40"], TXT: ["v=spf1 -all"], ttl: 90 },
        "nothing.test": { TXT: ["v=spf1 -all"] },
        "nullmx.test": { MX: [{ exchange: ".", priority: 0 }], A: ["127.0.0.41"] },
        "servfail.test": { rcode: "SERVFAIL" },

        "skip.test": {
          MX: [
            { exchange: "gone.skip.test", priority: 10 },
            { exchange: "noaddr.skip.test", priority: 20 },
            { exchange: "ok.skip.test", priority: 30 },
          ],
        },
        "noaddr.skip.test": { TXT: ["no addresses here"] },
        "ok.skip.test": { A: ["127.0.0.50"] },

        "alltemp.test": {
          MX: [
            { exchange: "down1.alltemp.test", priority: 10 },
            { exchange: "down2.alltemp.test", priority: 20 },
          ],
        },
        "down1.alltemp.test": { rcode: "SERVFAIL" },
        "down2.alltemp.test": { rcode: "SERVFAIL" },

        "sometemp.test": {
          MX: [
            { exchange: "down.sometemp.test", priority: 10 },
            { exchange: "up.sometemp.test", priority: 20 },
          ],
        },
        "down.sometemp.test": { rcode: "SERVFAIL" },
        "up.sometemp.test": { A: ["127.0.0.60"] },

        "allgone.test": { MX: [{ exchange: "gone.allgone.test", priority: 10 }] },

        "cname-mx.test": { MX: [{ exchange: "alias.cname-mx.test", priority: 10 }] },
        "alias.cname-mx.test": { CNAME: "real.cname-mx.test" },
        "real.cname-mx.test": { A: ["127.0.0.70"] },
      },
    });
    resolver = createResolver({ servers: [dns.address], timeoutMs: 1000, tries: 1 });
  });
  afterAll(() => dns.stop());

  it("orders MX hosts by preference, each with its A then AAAA addresses and the smaller TTL", async () => {
    const result = await resolveMailHosts(resolver, "ordered.test");
    expect(result).toEqual({
      kind: "hosts",
      hosts: [
        { exchange: "mx10.ordered.test", priority: 10, addresses: ["127.0.0.10", "::10"], ttl: 120 },
        { exchange: "mx20.ordered.test", priority: 20, addresses: ["127.0.0.20", "::20"], ttl: 60 },
        { exchange: "mx30.ordered.test", priority: 30, addresses: ["127.0.0.30"], ttl: 60 },
      ],
    });
  });

  it("shuffles hosts of equal preference on every call, keeping the backup last", async () => {
    const orders = new Set<string>();
    for (let i = 0; i < 60; i++) {
      const order = exchanges(await resolveMailHosts(resolver, "equal.test"));
      expect(order).toHaveLength(3);
      expect(order[2]).toBe("backup.equal.test");
      orders.add(order.join(" "));
    }
    expect(orders).toEqual(
      new Set(["a.equal.test b.equal.test backup.equal.test", "b.equal.test a.equal.test backup.equal.test"]),
    );
  });

  it("uses the domain itself as implicit MX when it has no MX records", async () => {
    expect(await resolveMailHosts(resolver, "Implicit.Test.")).toEqual({
      kind: "hosts",
      hosts: [{ exchange: "implicit.test", priority: 0, addresses: ["127.0.0.40", "::40"], ttl: 90 }],
    });
  });

  it("says none when there is neither MX nor A/AAAA", async () => {
    expect(await resolveMailHosts(resolver, "nothing.test")).toEqual({ kind: "none" });
  });

  it("recognises an RFC 7505 null MX, even when the domain has an address", async () => {
    expect(await resolveMailHosts(resolver, "nullmx.test")).toEqual({ kind: "nullmx" });
  });

  it("says nxdomain for a domain that does not exist", async () => {
    expect(await resolveMailHosts(resolver, "no-such-domain.test")).toEqual({ kind: "nxdomain" });
  });

  it("is temp when the MX lookup fails temporarily", async () => {
    const result = await resolveMailHosts(resolver, "servfail.test");
    expect(result.kind).toBe("temp");
    if (result.kind === "temp")
      expect(result.error).toMatchObject({ code: "SERVFAIL", qname: "servfail.test" });
  });

  it("skips MX hosts that do not exist or have no address", async () => {
    expect(exchanges(await resolveMailHosts(resolver, "skip.test"))).toEqual(["ok.skip.test"]);
  });

  it("is temp when every MX host fails temporarily", async () => {
    const result = await resolveMailHosts(resolver, "alltemp.test");
    expect(result.kind).toBe("temp");
    if (result.kind === "temp") expect(result.error.code).toBe("SERVFAIL");
  });

  it("delivers to the hosts that resolve when others fail temporarily", async () => {
    expect(exchanges(await resolveMailHosts(resolver, "sometemp.test"))).toEqual(["up.sometemp.test"]);
  });

  it("says none when no MX host has an address at all", async () => {
    expect(await resolveMailHosts(resolver, "allgone.test")).toEqual({ kind: "none" });
  });

  it("follows a CNAME from the MX host name to its address", async () => {
    const result = await resolveMailHosts(resolver, "cname-mx.test");
    expect(result).toMatchObject({
      kind: "hosts",
      hosts: [{ exchange: "alias.cname-mx.test", addresses: ["127.0.0.70"] }],
    });
  });
});
