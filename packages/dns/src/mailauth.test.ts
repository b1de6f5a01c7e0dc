import { type DnsServerHandle, startDnsServer, reverseName as testReverseName } from "@mailpipe/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createResolver, type MailauthResolverFn, mailauthResolver, reverseName } from "./index.ts";

const DKIM_KEY = `v=DKIM1; k=rsa; p=${"MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA".repeat(10)}`;

async function codeOf(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => "resolved",
    (err: NodeJS.ErrnoException) => err.code,
  );
}

describe("mailauthResolver", () => {
  let dns: DnsServerHandle;
  let resolve: MailauthResolverFn;

  beforeAll(async () => {
    dns = await startDnsServer({
      records: {
        "sender.test": {
          TXT: ["v=spf1 ip4:127.0.0.0/8 -all", "google-site-verification=abc"],
          MX: [{ exchange: "mx.sender.test", priority: 10 }],
          A: ["127.0.0.2"],
          AAAA: ["::2"],
        },
        "sel._domainkey.sender.test": { TXT: [DKIM_KEY] },
        "_dmarc.sender.test": { TXT: ["v=DMARC1; p=reject"] },
        "servfail.test": { rcode: "SERVFAIL" },
        "silent.test": { timeout: true },
        [testReverseName("127.0.0.2")]: { PTR: ["mx.sender.test"] },
      },
    });
    resolve = mailauthResolver(createResolver({ servers: [dns.address], timeoutMs: 200, tries: 1 }));
  });
  afterAll(() => dns.stop());

  it("resolves TXT as node does: one array of character-strings per record", async () => {
    expect(await resolve("sender.test", "TXT")).toEqual([
      ["v=spf1 ip4:127.0.0.0/8 -all"],
      ["google-site-verification=abc"],
    ]);
    const dkim = (await resolve("sel._domainkey.sender.test", "TXT")) as string[][];
    expect(dkim).toHaveLength(1);
    expect(dkim[0]!.length).toBeGreaterThan(1);
    expect(dkim[0]!.join("")).toBe(DKIM_KEY);
  });

  it("resolves MX as {exchange, priority} and A/AAAA as address strings", async () => {
    expect(await resolve("sender.test", "MX")).toEqual([{ exchange: "mx.sender.test", priority: 10 }]);
    expect(await resolve("sender.test", "A")).toEqual(["127.0.0.2"]);
    expect(await resolve("sender.test", "AAAA")).toEqual(["::2"]);
  });

  it("resolves PTR from an IP address or its reverse name", async () => {
    expect(reverseName("127.0.0.2")).toBe(testReverseName("127.0.0.2"));
    expect(reverseName("2001:db8::1")).toBe(testReverseName("2001:db8::1"));
    expect(await resolve("127.0.0.2", "PTR")).toEqual(["mx.sender.test"]);
    expect(await resolve(reverseName("127.0.0.2"), "PTR")).toEqual(["mx.sender.test"]);
  });

  it("rejects with ENOTFOUND for NXDOMAIN and ENODATA for NODATA, which mailauth reads as no record", async () => {
    expect(await codeOf(resolve("_dmarc.nowhere.test", "TXT"))).toBe("ENOTFOUND");
    expect(await codeOf(resolve("_dmarc.sender.test", "MX"))).toBe("ENODATA");
    const err = (await resolve("_dmarc.nowhere.test", "TXT").catch(
      (e: unknown) => e,
    )) as NodeJS.ErrnoException & {
      hostname: string;
    };
    expect(err).toBeInstanceOf(Error);
    expect(err.message).toBe("queryTxt ENOTFOUND _dmarc.nowhere.test");
    expect(err.syscall).toBe("queryTxt");
    expect(err.hostname).toBe("_dmarc.nowhere.test");
  });

  it("rejects with ESERVFAIL and ETIMEOUT for temporary failures, which mailauth reads as temperror", async () => {
    expect(await codeOf(resolve("servfail.test", "TXT"))).toBe("ESERVFAIL");
    expect(await codeOf(resolve("silent.test", "TXT"))).toBe("ETIMEOUT");
  });

  it("accepts lower-case type names and rejects types it does not know", async () => {
    expect(await resolve("sender.test", "mx")).toEqual([{ exchange: "mx.sender.test", priority: 10 }]);
    expect(await codeOf(resolve("sender.test", "SRV"))).toBe("ENOTIMP");
  });
});
