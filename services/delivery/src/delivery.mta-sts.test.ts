// MTA-STS (RFC 8461) and TLS-RPT (RFC 8460) against real parts: the DNS server on loopback serves
// `_mta-sts` and `_smtp._tls` TXT records, an HTTPS server on 127.0.0.4 with a certificate from a
// test CA serves the policy, SMTP peers on 127.0.0.2/3 play the MX hosts, Redis holds the cache.
import { mkdir, writeFile } from "node:fs/promises";
import https from "node:https";
import path from "node:path";
import { Writable } from "node:stream";
import { gunzipSync } from "node:zlib";
import type { Bus } from "@mailpipe/bus";
import { QueuedMail } from "@mailpipe/contracts";
import { dkimDnsRecord, generateDkimKey } from "@mailpipe/directory";
import { createResolver, mailauthResolver } from "@mailpipe/dns";
import { createTelemetry, type Telemetry } from "@mailpipe/telemetry";
import {
  createTestCa,
  type DnsServerHandle,
  freePort,
  type NatsHandle,
  type ServerHandle,
  startDnsServer,
  startNats,
  startRedis,
  type TempDir,
  type TestCa,
  tempDir,
  waitFor,
} from "@mailpipe/testing";
import { Redis } from "ioredis";
import { authenticate } from "mailauth";
import { simpleParser } from "mailparser";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  collectEvents,
  collectStatuses,
  connectBus,
  message,
  mx,
  publishRequest,
  quietTelemetry,
  resetBus,
  startPeers,
  testConfig,
} from "../test/helpers.ts";
import { type RunningDelivery, startDelivery } from "./service.ts";
import { dayOf } from "./tls-report.ts";

const POLICY_HOST = "127.0.0.4";
let nats: NatsHandle;
let redisServer: ServerHandle;
let redis: Redis;
let admin: Bus;
let ca: TestCa;
let dir: TempDir;
let caFile: string;
let dns: DnsServerHandle;
let policyServer: https.Server;
let policyPort: number;
/** what the policy host serves, per domain; and how many requests it got */
const policies = new Map<string, string>();
let fetches = 0;
const cleanups: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  nats = await startNats();
  redisServer = await startRedis();
  redis = new Redis(redisServer.url, { lazyConnect: false });
  admin = await connectBus(nats.url);
  ca = await createTestCa();
  dir = await tempDir("delivery-mta-sts");
  caFile = path.join(dir.path, "ca.pem");
  await writeFile(caFile, ca.cert);
  const policyCert = await ca.issue([
    "mta-sts.sts.test",
    "mta-sts.testing.test",
    "mta-sts.mismatch.test",
    "mta-sts.slow.test",
    "mta-sts.big.test",
    "mta-sts.signed.test",
  ]);
  policyServer = https.createServer({ key: policyCert.key, cert: policyCert.cert }, (req, res) => {
    fetches++;
    const domain = (req.headers.host ?? "").replace(/^mta-sts\./, "");
    if (domain === "slow.test") return; // never answers
    if (domain === "big.test") {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end(
        `version: STSv1\r\nmode: enforce\r\nmx: mx.big.test\r\nmax_age: 86400\r\n${"x: y\r\n".repeat(20_000)}`,
      );
      return;
    }
    const text = policies.get(domain);
    if (req.url !== "/.well-known/mta-sts.txt" || !text) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": "text/plain" }).end(text);
  });
  policyPort = await freePort(POLICY_HOST);
  await new Promise<void>((resolve) => policyServer.listen(policyPort, POLICY_HOST, resolve));
  dns = await startDnsServer();
}, 60_000);
afterAll(async () => {
  await new Promise((r) => policyServer?.close(r));
  await dns?.stop();
  redis?.disconnect();
  await redisServer?.stop();
  await admin?.close();
  await nats?.stop();
  await ca?.remove();
  await dir?.remove();
});
beforeEach(async () => {
  fetches = 0;
  policies.clear();
  dns.clear();
  await redis.flushall();
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  await resetBus(admin);
});

/** `domain` publishes an MTA-STS policy (id in TXT) and asks for TLS reports at tlsrpt@reports.test. */
function publishPolicy(domain: string, id: string, mode: string, mxPatterns: string[]) {
  dns.set(`_mta-sts.${domain}`, { TXT: [`v=STSv1; id=${id}`], ttl: 0 });
  dns.set(`mta-sts.${domain}`, { A: [POLICY_HOST] });
  dns.set(`_smtp._tls.${domain}`, {
    TXT: ["v=TLSRPTv1; rua=mailto:tlsrpt@reports.test,https://reports.test/x"],
  });
  policies.set(
    domain,
    ["version: STSv1", `mode: ${mode}`, ...mxPatterns.map((m) => `mx: ${m}`), "max_age: 86400", ""].join(
      "\r\n",
    ),
  );
}

async function peers(...args: Parameters<typeof startPeers>) {
  const started = await startPeers(...args);
  cleanups.push(() => Promise.all(started.peers.map((p) => p.stop())));
  return started;
}

async function worker(
  port: number,
  env: Record<string, string> = {},
  telemetry: Telemetry = quietTelemetry(),
): Promise<RunningDelivery> {
  const bus = await connectBus(nats.url, telemetry);
  const config = testConfig(nats.url, port, {
    MTA_STS: "on",
    MTA_STS_PORT: String(policyPort),
    DNS_SERVERS: dns.address,
    OUTBOUND_TLS_CA_FILE: caFile,
    ...env,
  });
  const delivery = await startDelivery({ config, bus, telemetry, redis });
  cleanups.push(async () => {
    await delivery.stop();
    await bus.close();
  });
  return delivery;
}

function watch() {
  const statuses = collectStatuses(admin);
  const events = collectEvents(admin);
  cleanups.push(async () => {
    await (await statuses).stop();
    await events.stop();
  });
  return { statuses, events };
}

describe("MTA-STS", () => {
  it("enforce: delivers over verified TLS to a listed MX; the policy is cached in Redis and shared by a second worker", async () => {
    publishPolicy("sts.test", "20261204a", "enforce", ["*.sts.test"]);
    const cert = await ca.issue(["mx1.sts.test"]);
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"], () => ({ certificate: cert }));
    await worker(port);
    const { events } = watch();
    await publishRequest(admin, {
      domain: "sts.test",
      hosts: [mx("mx1.sts.test", 10, "127.0.0.2")],
      recipients: ["bob@sts.test"],
      body: message("sts", "bob@sts.test"),
    });
    const [got] = await peer!.waitForMessages(1);
    expect(got!.tls).toBe(true);
    const e = await events.waitFor("delivered", "bob@sts.test");
    expect(e.tls).toMatchObject({
      policy: "verify",
      source: "mta-sts",
      verified: true,
      cipher: got!.tlsCipher,
    });
    const cached = JSON.parse((await redis.get("mta-sts:policy:sts.test"))!);
    expect(cached).toMatchObject({ id: "20261204a", mode: "enforce", mx: ["*.sts.test"], maxAge: 86400 });
    expect(await redis.pttl("mta-sts:policy:sts.test")).toBeGreaterThan(86_000_000);
    expect(fetches).toBe(1);

    // another replica, same Redis: no second fetch while the TXT id is the same
    const second = await worker(port);
    expect((await second.mtaSts!.lookup("sts.test")).policy?.id).toBe("20261204a");
    expect(fetches).toBe(1);
    // a new id in DNS: fetched again
    dns.set("_mta-sts.sts.test", { TXT: ["v=STSv1; id=20261204b"], ttl: 0 });
    policies.set("sts.test", "version: STSv1\r\nmode: testing\r\nmx: *.sts.test\r\nmax_age: 600\r\n");
    const renewed = await second.mtaSts!.lookup("sts.test");
    expect(renewed.policy).toMatchObject({ id: "20261204b", mode: "testing", maxAge: 600 });
    expect(fetches).toBe(2);
  });

  it("enforce: defers with 4.7.5 when the MX is not in the policy, and with 4.7.4 when the MX offers no STARTTLS", async () => {
    publishPolicy("sts.test", "1", "enforce", ["mx1.sts.test"]);
    const {
      port,
      peers: [unlisted, plain],
    } = await peers(["127.0.0.2", "127.0.0.3"]);
    await worker(port);
    const { statuses } = watch();
    await publishRequest(admin, {
      domain: "sts.test",
      hosts: [mx("evil.attacker.test", 10, "127.0.0.2")],
      recipients: ["bob@sts.test"],
      body: message("mismatch", "bob@sts.test"),
    });
    await publishRequest(admin, {
      domain: "sts.test",
      hosts: [mx("mx1.sts.test", 10, "127.0.0.3")],
      recipients: ["carol@sts.test"],
      body: message("no starttls", "carol@sts.test"),
    });
    const seen = await (await statuses).waitFor(2);
    const mismatch = seen.find((s) => s.status.recipient === "bob@sts.test")!.status;
    expect(mismatch).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(mismatch.reply.text).toMatch(
      /evil\.attacker\.test does not match the MTA-STS policy of sts\.test/,
    );
    expect(unlisted!.connections).toBe(0);
    const noTls = seen.find((s) => s.status.recipient === "carol@sts.test")!.status;
    expect(noTls).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.4" } });
    expect(noTls.reply.text).toMatch(/MTA-STS enforce/);
    expect(plain!.messages).toHaveLength(0);
  });

  it("testing: delivers anyway and records the failures; the daily report is gzip JSON with the right counts, sent through the pipeline", async () => {
    publishPolicy("testing.test", "7", "testing", ["mx.testing.test"]);
    const good = await ca.issue(["mx.testing.test"]);
    const {
      port,
      peers: [plain, verified],
    } = await peers(["127.0.0.2", "127.0.0.3"], (host) =>
      host === "127.0.0.3" ? { certificate: good } : {},
    );
    const delivery = await worker(port, { SMTP_REUSE_CONNECTIONS: "false" });
    const { statuses } = watch();
    // one session to a host without STARTTLS, two verified ones
    await publishRequest(admin, {
      domain: "testing.test",
      hosts: [mx("mx.testing.test", 10, "127.0.0.2")],
      recipients: ["a@testing.test"],
      body: message("plain", "a@testing.test"),
    });
    for (const r of ["b@testing.test", "c@testing.test"]) {
      await publishRequest(admin, {
        domain: "testing.test",
        hosts: [mx("mx.testing.test", 10, "127.0.0.3")],
        recipients: [r],
        body: message("verified", r),
      });
    }
    const seen = await (await statuses).waitFor(3);
    expect(seen.every((s) => s.status.outcome === "delivered")).toBe(true);
    expect(plain!.messages[0]!.tls).toBe(false);
    expect(verified!.messages.map((m) => m.tls)).toEqual([true, true]);

    const results = await delivery.tlsReports!.store.results(dayOf(new Date()), "testing.test");
    expect(results.successes).toEqual({ sts: 2 });
    expect(results.failures).toEqual([
      {
        policy: "sts",
        resultType: "starttls-not-supported",
        mxHost: "mx.testing.test",
        ip: "127.0.0.2",
        count: 1,
      },
    ]);

    // the report: one message on the spool, as the router will route it
    const reports: { mail: QueuedMail; raw: Buffer }[] = [];
    const sub = await admin.consume("router", QueuedMail, (mail, ctx) => {
      reports.push({ mail, raw: Buffer.from(ctx.attachment!) });
    });
    cleanups.push(() => sub.stop());
    const today = dayOf(new Date());
    const sent = await delivery.tlsReports!.send(today);
    expect(sent).toHaveLength(1);
    expect(await delivery.tlsReports!.send(today)).toHaveLength(0); // once per day and domain
    const deadline = Date.now() + 10_000;
    while (reports.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    const [{ mail, raw }] = reports as [{ mail: QueuedMail; raw: Buffer }];
    expect(mail).toMatchObject({
      source: "report",
      envelope: { mailFrom: "", rcptTo: [{ address: "tlsrpt@reports.test" }] },
    });
    const parsed = await simpleParser(raw);
    expect(parsed.headers.get("tls-report-domain")).toBe("testing.test");
    expect(parsed.subject).toMatch(/^Report Domain: testing\.test Submitter: out\.sender\.test Report-ID: </);
    expect(String((parsed.headers.get("content-type") as { value: string }).value)).toBe("multipart/report");
    const gz = parsed.attachments.find((a) => a.contentType === "application/tlsrpt+gzip")!;
    expect(gz.filename).toMatch(/^out\.sender\.test!testing\.test!\d+!\d+!.+\.json\.gz$/);
    const report = JSON.parse(gunzipSync(gz.content).toString("utf8"));
    expect(report["organization-name"]).toBe("out.sender.test");
    expect(report["date-range"]).toEqual({
      "start-datetime": `${today}T00:00:00Z`,
      "end-datetime": `${today}T23:59:59Z`,
    });
    expect(report.policies).toEqual([
      {
        policy: {
          "policy-type": "sts",
          "policy-string": ["version: STSv1", "mode: testing", "mx: mx.testing.test", "max_age: 86400"],
          "policy-domain": "testing.test",
          "mx-host": ["mx.testing.test"],
        },
        summary: { "total-successful-session-count": 2, "total-failure-session-count": 1 },
        "failure-details": [
          {
            "result-type": "starttls-not-supported",
            "receiving-mx-hostname": "mx.testing.test",
            "receiving-ip": "127.0.0.2",
            "failed-session-count": 1,
          },
        ],
      },
    ]);
  });

  it("a policy host whose certificate does not verify gives no policy (and a sts-webpki-invalid failure): mail goes out opportunistically", async () => {
    publishPolicy("mismatch.test", "1", "enforce", ["mx.mismatch.test"]);
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"]);
    // the worker does not trust the test CA: the policy host's certificate fails verification
    const delivery = await worker(port, { OUTBOUND_TLS_CA_FILE: "" });
    const looked = await delivery.mtaSts!.lookup("mismatch.test");
    expect(looked.policy).toBeUndefined();
    expect(looked.failure).toMatchObject({ type: "sts-webpki-invalid" });
    const { statuses } = watch();
    await publishRequest(admin, {
      domain: "mismatch.test",
      hosts: [mx("mx.mismatch.test", 10, "127.0.0.2")],
      recipients: ["bob@mismatch.test"],
      body: message("no policy", "bob@mismatch.test"),
    });
    const [s] = await (await statuses).waitFor(1);
    expect(s!.status.outcome).toBe("delivered");
    expect(peer!.messages).toHaveLength(1);
  });

  it("refreshes a cached policy in the background before it expires, one fetch for every replica", async () => {
    publishPolicy("sts.test", "r1", "enforce", ["*.sts.test"]);
    policies.set("sts.test", "version: STSv1\r\nmode: enforce\r\nmx: *.sts.test\r\nmax_age: 600\r\n");
    const a = await worker(25, { MTA_STS_REFRESH_AFTER: "1s" });
    const b = await worker(25, { MTA_STS_REFRESH_AFTER: "1s" });
    expect((await a.mtaSts!.lookup("sts.test")).policy).toMatchObject({ id: "r1", maxAge: 600 });
    expect(fetches).toBe(1);
    const first = JSON.parse((await redis.get("mta-sts:policy:sts.test"))!);
    // the host now serves a longer max_age under the same id: only a refresh brings it in
    policies.set("sts.test", "version: STSv1\r\nmode: enforce\r\nmx: *.sts.test\r\nmax_age: 7200\r\n");
    // messages on both replicas keep using the cached policy; once it is older than 1 s, one of them
    // starts the refresh
    const used: (number | undefined)[] = [];
    const refreshed = await waitFor(async () => {
      for (const w of [a, b]) used.push((await w.mtaSts!.lookup("sts.test")).policy?.maxAge);
      const now = JSON.parse((await redis.get("mta-sts:policy:sts.test"))!);
      return now.maxAge === 7200 && now;
    });
    expect(used.every((m) => m === 600 || m === 7200)).toBe(true);
    expect(Date.parse(refreshed.fetchedAt)).toBeGreaterThan(Date.parse(first.fetchedAt));
    expect(Date.parse(refreshed.expiresAt)).toBeGreaterThan(Date.parse(first.expiresAt));
    expect(await redis.pttl("mta-sts:policy:sts.test")).toBeGreaterThan(600_000);
    // more messages on both replicas: the claim in Redis kept it to one refresh
    for (const w of [a, b, a, b]) await w.mtaSts!.lookup("sts.test");
    // (any refresh still running has ended)
    await Promise.all([a.mtaSts!.close(), b.mtaSts!.close()]);
    expect(fetches).toBe(2);
    // another replica reads the refreshed policy from Redis, fetching nothing (the two above may
    // keep their one-minute memo of the same policy id until it lapses)
    const c = await worker(25, { MTA_STS_REFRESH_AFTER: "1s" });
    expect(await c.mtaSts!.lookup("sts.test")).toMatchObject({ policy: { maxAge: 7200 } });
    expect(fetches).toBe(2);
  }, 30_000);

  it("a refresh that fails leaves the cached policy in force: enforce still defers a mismatching MX", async () => {
    publishPolicy("sts.test", "f1", "enforce", ["mx1.sts.test"]);
    const {
      port,
      peers: [unlisted],
    } = await peers(["127.0.0.2"]);
    const delivery = await worker(port, { MTA_STS_REFRESH_AFTER: "1s" });
    expect((await delivery.mtaSts!.lookup("sts.test")).policy?.id).toBe("f1");
    const cached = await redis.get("mta-sts:policy:sts.test");
    // the policy host goes away (404), the TXT record stays
    policies.delete("sts.test");
    const failure = await waitFor(async () => {
      expect((await delivery.mtaSts!.lookup("sts.test")).policy?.id).toBe("f1");
      return redis.get("mta-sts:failure:sts.test");
    });
    expect(JSON.parse(failure)).toMatchObject({ id: "f1", type: "sts-policy-fetch-error" });
    expect(JSON.parse(failure).detail).toMatch(/HTTP 404/);
    expect(fetches).toBe(2);
    expect(await redis.get("mta-sts:policy:sts.test")).toBe(cached);

    const { statuses } = watch();
    await publishRequest(admin, {
      domain: "sts.test",
      hosts: [mx("evil.attacker.test", 10, "127.0.0.2")],
      recipients: ["bob@sts.test"],
      body: message("after a failed refresh", "bob@sts.test"),
    });
    const [s] = await (await statuses).waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(s!.status.reply.text).toMatch(/does not match the MTA-STS policy of sts\.test/);
    expect(unlisted!.connections).toBe(0);
    // the failed refresh is not tried again for every message
    expect(fetches).toBe(2);
  }, 30_000);

  it("bounds the policy fetch in time and size: a host that never answers and a policy over 64 KiB give no policy", async () => {
    for (const d of ["slow.test", "big.test"]) {
      dns.set(`_mta-sts.${d}`, { TXT: ["v=STSv1; id=1"], ttl: 0 });
      dns.set(`mta-sts.${d}`, { A: [POLICY_HOST] });
    }
    const delivery = await worker(25, { MTA_STS_FETCH_TIMEOUT: "500ms" });
    const slow = await delivery.mtaSts!.lookup("slow.test");
    expect(slow.policy).toBeUndefined();
    expect(slow.failure).toMatchObject({ type: "sts-policy-fetch-error" });
    // the fetch's own deadline ended it (the server never answers)
    expect(slow.failure!.detail).toMatch(/no policy within 500 ms|timed out/);
    const big = await delivery.mtaSts!.lookup("big.test");
    expect(big.policy).toBeUndefined();
    expect(big.failure).toMatchObject({ type: "sts-policy-invalid" });
    expect(big.failure!.detail).toMatch(/larger than 65536 bytes/);
    // held: the next message does not fetch again for the same id
    const before = fetches;
    expect((await delivery.mtaSts!.lookup("big.test")).failure?.type).toBe("sts-policy-invalid");
    expect(fetches).toBe(before);
  });
});

/** A telemetry whose log lines the test can read. */
function loggingTelemetry() {
  const lines: { level: number; msg: string; [k: string]: unknown }[] = [];
  const telemetry = createTelemetry({
    service: "delivery",
    logLevel: "info",
    defaultMetrics: false,
    logDestination: new Writable({
      write(chunk, _e, cb) {
        for (const l of String(chunk).split("\n")) if (l) lines.push(JSON.parse(l));
        cb();
      },
    }),
  });
  return { telemetry, lines };
}

/** A directory file for sender.test (MAIL_HOSTNAME out.sender.test's parent), with a DKIM key or none. */
async function directoryFile(name: string, pem?: string): Promise<string> {
  const folder = path.join(dir.path, name);
  await mkdir(path.join(folder, "keys"), { recursive: true });
  let dkim = "";
  if (pem) {
    await writeFile(path.join(folder, "keys", "sender.test.rpt.pem"), pem);
    dkim = "    dkim:\n      selector: rpt\n      privateKeyFile: keys/sender.test.rpt.pem\n";
  }
  const file = path.join(folder, "directory.yaml");
  await writeFile(file, `domains:\n  sender.test:\n${dkim}`);
  return file;
}

/** Reads mail.v1.queued as the router does, keeping each report with its body. */
async function queuedReports() {
  const reports: { mail: QueuedMail; raw: Buffer }[] = [];
  const sub = await admin.consume("router", QueuedMail, (mail, ctx) => {
    reports.push({ mail, raw: Buffer.from(ctx.attachment!) });
  });
  cleanups.push(() => sub.stop());
  return reports;
}

describe("TLS-RPT reports are DKIM-signed (RFC 8460 3)", () => {
  it("with the directory's key of the From's domain (postmaster@out.sender.test signs as sender.test): the copy the report address's MX receives passes DKIM", async () => {
    const pem = await generateDkimKey("rsa-sha256");
    dns.set("rpt._domainkey.sender.test", { TXT: [dkimDnsRecord(pem)] });
    // (a domain of its own: JetStream drops a second report for testing.test today as a duplicate)
    publishPolicy("signed.test", "7", "testing", ["mx.signed.test"]);
    const {
      port,
      peers: [plain, reportMx],
    } = await peers(["127.0.0.2", "127.0.0.3"]);
    const delivery = await worker(port, { DIRECTORY_FILE: await directoryFile("signed", pem) });
    const { statuses } = watch();
    // a session without STARTTLS to a domain in MTA-STS testing mode: one failure to report
    await publishRequest(admin, {
      domain: "signed.test",
      hosts: [mx("mx.signed.test", 10, "127.0.0.2")],
      recipients: ["a@signed.test"],
      body: message("plain", "a@signed.test"),
    });
    await (await statuses).waitFor(1);
    expect(plain!.messages).toHaveLength(1);
    const today = dayOf(new Date());
    await waitFor(async () => (await delivery.tlsReports!.store.domains(today)).includes("signed.test"));

    const reports = await queuedReports();
    expect(await delivery.tlsReports!.send(today)).toHaveLength(1);
    const { mail, raw } = (await waitFor(() => reports.length > 0 && reports))[0]!;
    // the router's part: route the report to the rua's MX, and delivery sends it
    await publishRequest(admin, {
      domain: "reports.test",
      hosts: [mx("mx.reports.test", 10, "127.0.0.3")],
      recipients: mail.envelope.rcptTo.map((r) => r.address),
      body: raw,
      mailFrom: mail.envelope.mailFrom,
    });
    const [got] = await reportMx!.waitForMessages(1);
    expect(got!.rcptTo).toEqual(["tlsrpt@reports.test"]);
    const result = (await authenticate(got!.raw, {
      ip: "127.0.0.1",
      helo: "out.sender.test",
      sender: "",
      mta: "mx.reports.test",
      resolver: mailauthResolver(createResolver({ servers: [dns.address] })) as never,
    } as never)) as unknown as {
      dkim: {
        results: {
          signingDomain: string;
          selector: string;
          status: { result: string; aligned?: string | false };
          signingHeaders?: { keys: string };
        }[];
      };
    };
    const [sig] = result.dkim.results;
    expect(sig).toMatchObject({ signingDomain: "sender.test", selector: "rpt", status: { result: "pass" } });
    // it covers the report's own header fields too
    expect(sig!.signingHeaders!.keys.toLowerCase().split(": ").join(":").split(":")).toEqual(
      expect.arrayContaining([
        "from",
        "subject",
        "tls-report-domain",
        "tls-report-submitter",
        "content-type",
      ]),
    );
    // and the report is still the report
    const parsed = await simpleParser(got!.raw);
    expect(parsed.headers.get("tls-report-domain")).toBe("signed.test");
    expect(parsed.from?.value[0]?.address).toBe("postmaster@out.sender.test");
  }, 30_000);

  it("without a key for the reporting domain the reports go out unsigned, with one warning per domain saying what to configure", async () => {
    const { telemetry, lines } = loggingTelemetry();
    const delivery = await worker(25, { DIRECTORY_FILE: await directoryFile("unsigned") }, telemetry);
    const today = dayOf(new Date());
    const store = delivery.tlsReports!.store;
    for (const domain of ["one.test", "two.test"]) {
      dns.set(`_smtp._tls.${domain}`, { TXT: [`v=TLSRPTv1; rua=mailto:tlsrpt@${domain}`] });
      store.record(
        domain,
        { type: "sts", strings: ["version: STSv1", "mode: testing"], mxHosts: [`mx.${domain}`] },
        `mx.${domain}`,
        "192.0.2.1",
        { policy: "verify", source: "mta-sts" },
      );
    }
    await waitFor(async () => (await store.domains(today)).length === 2);
    const reports = await queuedReports();
    expect(await delivery.tlsReports!.send(today)).toHaveLength(2);
    await waitFor(() => reports.length === 2);
    for (const { raw } of reports) {
      expect(raw.toString("latin1")).not.toMatch(/^DKIM-Signature:/im);
      expect((await simpleParser(raw)).headers.get("tls-report-submitter")).toBe("out.sender.test");
    }
    const warnings = lines.filter((l) => /no DKIM key for out\.sender\.test/.test(l.msg));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]!.msg).toMatch(/mailctl dkim keygen/);
  }, 30_000);
});
