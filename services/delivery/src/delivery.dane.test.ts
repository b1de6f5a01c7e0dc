// DANE (RFC 7672) with DANE=on: the DNS server on loopback plays a validating resolver that sets AD
// for the signed zone dane.test (and not for plain.test); TLSA records match, or do not match, the
// certificates of SMTP peers on loopback.
import type { Bus } from "@mailpipe/bus";
import {
  createTestCa,
  type DnsServerHandle,
  type NatsHandle,
  startDnsServer,
  startNats,
  type TestCa,
} from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { daneEe, daneTa, startDaneDelivery } from "../test/dane.ts";
import { connectBus, message, mx, publishRequest, resetBus, testConfig } from "../test/helpers.ts";

let nats: NatsHandle;
let admin: Bus;
let ca: TestCa;
let dns: DnsServerHandle;
const cleanups: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  nats = await startNats();
  admin = await connectBus(nats.url);
  ca = await createTestCa("DANE Test CA");
  dns = await startDnsServer({ secureZones: ["dane.test"] });
}, 60_000);
afterAll(async () => {
  await dns?.stop();
  await admin?.close();
  await nats?.stop();
  await ca?.remove();
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  dns.clear();
  await resetBus(admin);
});

const setup = (hosts: string[], options: Parameters<typeof startDaneDelivery>[2]) =>
  startDaneDelivery({ natsUrl: nats.url, admin, cleanups }, hosts, options, () => dns.address);

describe("DANE", () => {
  it("DANE-EE: delivers when the certificate matches the TLSA record (self-signed is fine), defers with 4.7.5 when it does not", async () => {
    const good = await ca.issue(["anything.example"]); // DANE-EE ignores names and issuers
    const other = await ca.issue(["mx2.dane.test"]);
    const { port, peers, statuses, events } = await setup(["127.0.0.2", "127.0.0.3"], (host) => ({
      certificate: host === "127.0.0.2" ? good : other,
    }));
    dns.set("mx1.dane.test", { A: ["127.0.0.2"] });
    dns.set(`_${port}._tcp.mx1.dane.test`, { TLSA: [daneEe(good)] });
    dns.set("mx2.dane.test", { A: ["127.0.0.3"] });
    dns.set(`_${port}._tcp.mx2.dane.test`, { TLSA: [daneEe(good)] }); // pins a key mx2 does not have
    await publishRequest(admin, {
      domain: "dane.test",
      hosts: [mx("mx1.dane.test", 10, "127.0.0.2")],
      recipients: ["bob@dane.test"],
      body: message("dane ee", "bob@dane.test"),
    });
    await publishRequest(admin, {
      domain: "other.dane.test",
      hosts: [mx("mx2.dane.test", 10, "127.0.0.3")],
      recipients: ["carol@other.dane.test"],
      body: message("dane mismatch", "carol@other.dane.test"),
    });
    const [got] = await peers[0]!.waitForMessages(1);
    expect(got!.tls).toBe(true);
    const e = await events.waitFor("delivered", "bob@dane.test");
    expect(e.tls).toMatchObject({ policy: "dane", source: "dane", verified: true, cipher: got!.tlsCipher });
    const seen = await statuses.waitFor(2);
    const refused = seen.find((s) => s.status.recipient === "carol@other.dane.test")!.status;
    expect(refused).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(refused.reply.text).toMatch(/not verified \(dane\)/);
    expect(peers[1]!.messages).toHaveLength(0);
  });

  it("DANE-TA: delivers when the chain leads to the pinned CA and the name matches; no STARTTLS under DANE defers with 4.7.4", async () => {
    const chained = await ca.issue(["mx1.dane.test"], { chain: true });
    const { port, peers, statuses, events } = await setup(["127.0.0.2", "127.0.0.3"], (host) =>
      host === "127.0.0.2" ? { certificate: chained } : {},
    );
    dns.set("mx1.dane.test", { A: ["127.0.0.2"] });
    dns.set(`_${port}._tcp.mx1.dane.test`, { TLSA: [daneTa(ca.cert)] });
    dns.set("mx3.dane.test", { A: ["127.0.0.3"] });
    dns.set(`_${port}._tcp.mx3.dane.test`, { TLSA: [daneTa(ca.cert)] });
    await publishRequest(admin, {
      domain: "dane.test",
      hosts: [mx("mx1.dane.test", 10, "127.0.0.2")],
      recipients: ["bob@dane.test"],
      body: message("dane ta", "bob@dane.test"),
    });
    await publishRequest(admin, {
      domain: "three.dane.test",
      hosts: [mx("mx3.dane.test", 10, "127.0.0.3")],
      recipients: ["dave@three.dane.test"],
      body: message("stripped", "dave@three.dane.test"),
    });
    await peers[0]!.waitForMessages(1);
    const e = await events.waitFor("delivered", "bob@dane.test");
    expect(e.tls).toMatchObject({ policy: "dane", verified: true });
    const seen = await statuses.waitFor(2);
    const stripped = seen.find((s) => s.status.recipient === "dave@three.dane.test")!.status;
    expect(stripped).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.4" } });
    expect(peers[1]!.messages).toHaveLength(0);
  });

  it("trusts TLSA records only with the AD bit: in an unsigned zone they are ignored and TLS stays opportunistic", async () => {
    const cert = await ca.issue(["mx.plain.test"]);
    const { port, peers, events } = await setup(["127.0.0.2"], () => ({ starttls: true }));
    dns.set("mx.plain.test", { A: ["127.0.0.2"] });
    dns.set(`_${port}._tcp.mx.plain.test`, { TLSA: [daneEe(cert)] }); // does not match, but unsigned
    await publishRequest(admin, {
      domain: "plain.test",
      hosts: [mx("mx.plain.test", 10, "127.0.0.2")],
      recipients: ["bob@plain.test"],
      body: message("insecure zone", "bob@plain.test"),
    });
    await peers[0]!.waitForMessages(1);
    const e = await events.waitFor("delivered", "bob@plain.test");
    expect(e.tls).toMatchObject({ policy: "opportunistic", source: "default", verified: false });
  });

  it("defers with 4.7.5 when the TLSA lookup fails in a signed zone, rather than sending without DANE", async () => {
    const { port, peers, statuses } = await setup(["127.0.0.2"], () => ({ starttls: true }));
    dns.set("mx.dane.test", { A: ["127.0.0.2"] });
    dns.set(`_${port}._tcp.mx.dane.test`, { rcode: "SERVFAIL" });
    await publishRequest(admin, {
      domain: "dane.test",
      hosts: [mx("mx.dane.test", 10, "127.0.0.2")],
      recipients: ["bob@dane.test"],
      body: message("bogus", "bob@dane.test"),
    });
    const [s] = await statuses.waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(s!.status.reply.text).toMatch(/DANE TLSA lookup for mx\.dane\.test failed/);
    expect(peers[0]!.connections).toBe(0);
  });

  it("refuses DANE=on without DANE_RESOLVERS at start", () => {
    expect(() => testConfig(nats.url, 25, { DANE: "on" })).toThrow(/DANE_RESOLVERS/);
  });
});
