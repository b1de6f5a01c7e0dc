// npm start's DNS server (scripts/dev-dns.ts) answers for the development domain and passes every
// other name to the system's resolvers, stood in for here by the test kit's DNS server. A resolver
// that never answers is a temporary failure: mail submitted to such a domain is deferred with
// 451 4.4.3 and retried, never bounced as "domain not found".
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { createResolver, DnsError, readResolvConf } from "@mailpipe/dns";
import { type DnsServerHandle, repoRoot, startDnsServer, waitFor } from "@mailpipe/testing";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DevDns, startDevDns } from "../../scripts/dev-dns.ts";
import { type Pipeline, startPipeline } from "./harness.ts";

const exec = promisify(execFile);
const DKIM = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

let upstream: DnsServerHandle;
let silent: DnsServerHandle;
let dev: DevDns;
let offline: DevDns;

beforeAll(async () => {
  upstream = await startDnsServer({
    records: {
      "gmail.com": { MX: [{ exchange: "gmail-smtp-in.l.google.com", priority: 5 }], ttl: 3600 },
      "gmail-smtp-in.l.google.com": { A: ["127.0.0.2"], ttl: 300 },
      // a resolver would answer these too, but npm start must not ask it
      "elsewhere.test": { A: ["127.0.0.9"] },
      "1.0.0.127.in-addr.arpa": { PTR: ["upstream.example.com"] },
    },
  });
  // stands in for a resolver that is configured but unreachable: every question, no answer
  silent = await startDnsServer({ records: { "gmail.com": { timeout: true } } });
  dev = await startDevDns({ host: "127.0.0.1", port: 0, upstream: [upstream.address], dkimValue: DKIM });
  offline = await startDevDns({ host: "127.0.0.1", port: 0, upstream: [silent.address] });
});

afterAll(async () => {
  await Promise.all([dev?.server.stop(), offline?.server.stop(), upstream?.stop(), silent?.stop()]);
});

describe("npm start's DNS", () => {
  it("answers for the development domain itself: MX, SPF, DMARC, DKIM", async () => {
    const r = createResolver({ servers: [dev.server.address], cache: false });
    expect(await r.mx("example.test")).toMatchObject({
      kind: "records",
      records: [{ exchange: "mail.example.test", priority: 10 }],
    });
    expect(await r.txt("example.test")).toMatchObject({ records: [["v=spf1 ip4:127.0.0.0/8 -all"]] });
    expect(await r.txt("_dmarc.example.test")).toMatchObject({ records: [["v=DMARC1; p=none"]] });
    expect(await r.txt("mail._domainkey.example.test")).toMatchObject({ records: [[DKIM]] });
    expect(upstream.queries.filter((q) => q.name.endsWith("example.test"))).toEqual([]);
  });

  it("passes other names to the system's resolver and relays its answer, TTLs kept", async () => {
    const r = createResolver({ servers: [dev.server.address], cache: false });
    expect(await r.mx("gmail.com")).toEqual({
      kind: "records",
      records: [{ exchange: "gmail-smtp-in.l.google.com", priority: 5, ttl: 3600 }],
      ttl: 3600,
    });
    expect(await r.a("gmail-smtp-in.l.google.com")).toMatchObject({
      records: [{ address: "127.0.0.2", ttl: 300 }],
    });
    expect(await r.mx("no-such-domain.example.com")).toMatchObject({ kind: "nxdomain" });
    expect(upstream.queries.map((q) => q.name)).toEqual(
      expect.arrayContaining(["gmail.com", "gmail-smtp-in.l.google.com", "no-such-domain.example.com"]),
    );
  });

  it("answers special-use names and loopback reverse names itself, online or not", async () => {
    const r = createResolver({ servers: [offline.server.address], cache: false, timeoutMs: 5000 });
    const before = { upstream: upstream.queries.length, silent: silent.queries.length };
    expect(await r.a("elsewhere.test")).toMatchObject({ kind: "nxdomain" });
    expect((await r.query("1.0.0.127.in-addr.arpa", "PTR")).rcode).toBe("NXDOMAIN");
    expect(await r.txt("_dmarc.someone.invalid")).toMatchObject({ kind: "nxdomain" });
    const d = createResolver({ servers: [dev.server.address], cache: false });
    expect(await d.a("elsewhere.test")).toMatchObject({ kind: "nxdomain" });
    expect(upstream.queries.length).toBe(before.upstream);
    expect(silent.queries.length).toBe(before.silent);
  });

  it("fails temporarily (SERVFAIL) when the resolver never answers", async () => {
    const r = createResolver({ servers: [offline.server.address], cache: false, tries: 1 });
    const err = await r.mx("gmail.com").then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(DnsError);
    expect(err).toMatchObject({ code: "SERVFAIL", temporary: true, qname: "gmail.com" });
    expect(silent.queries.map((q) => q.name)).toContain("gmail.com");
  });

  it("uses the nameservers of /etc/resolv.conf unless told otherwise", async () => {
    const own = await startDevDns({ host: "127.0.0.1", port: 0 });
    try {
      expect(own.upstream).toEqual(readResolvConf().map((s) => (s.includes(":") ? `[${s}]:53` : `${s}:53`)));
    } finally {
      await own.server.stop();
    }
  });
});

describe("mail to a domain the offline development DNS cannot resolve", () => {
  let p: Pipeline;

  beforeAll(async () => {
    p = await startPipeline({
      services: ["msa", "router", "mda"],
      env: { DNS_SERVERS: offline.server.address, RETRY_SCHEDULE: "1h", RETRY_JITTER: "0" },
    });
  });

  afterAll(() => p?.stop());

  it("is deferred with 451 4.4.3 and kept for a retry, not bounced", async () => {
    const transport = nodemailer.createTransport({
      host: "127.0.0.1",
      port: p.ports.submission,
      requireTLS: true,
      tls: { rejectUnauthorized: false },
      auth: { user: "alice@example.test", pass: "alice-dev-password" },
    } as TransportOptions);
    const sent = await transport.sendMail({
      from: "alice@example.test",
      to: "someone@gmail.com",
      subject: "to the Internet",
      text: "hello",
    });
    expect(sent.response).toMatch(/^250 /);

    const entry = await waitFor(
      async () => {
        const { stdout } = await exec(
          "node",
          [join(repoRoot, "packages/mailctl/src/main.ts"), "queue", "--json"],
          { env: { ...process.env, REDIS_URL: p.redis.url } },
        );
        const list = JSON.parse(stdout).scheduled as {
          recipient: string;
          destination: string;
          lastReply?: { code: number; enhanced: string; text: string };
        }[];
        return list.find((e) => e.recipient === "someone@gmail.com") ?? false;
      },
      { timeoutMs: 30_000, message: "the message never showed as a scheduled retry in mailctl queue" },
    );
    expect(entry.destination).toBe("gmail.com");
    expect(entry.lastReply).toMatchObject({ code: 451, enhanced: "4.4.3" });
    expect(silent.queries.some((q) => q.name === "gmail.com")).toBe(true);
    // and alice got no bounce
    expect(await p.mailbox("alice@example.test")).toEqual([]);
  }, 60_000);
});
