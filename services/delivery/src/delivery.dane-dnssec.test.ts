// DANE (RFC 7672) behind a real DNSSEC chain, as an operator runs it: DANE_RESOLVERS is a local
// validating unbound (packages/testing/src/unbound.ts) whose zones are signed with ldns-signzone and
// anchored by their KSK; it sets AD only on answers it validated and answers SERVFAIL for bogus ones.
// The MX hosts come in the request (router resolves them); delivery asks unbound for their A and TLSA
// records, and SMTP peers on loopback show their certificates.
import type { Bus } from "@mailpipe/bus";
import {
  createTestCa,
  type NatsHandle,
  startNats,
  startUnbound,
  type TestCa,
  type UnboundZone,
} from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { daneEe, daneTa, startDaneDelivery, tlsaLine } from "../test/dane.ts";
import { connectBus, message, mx, publishRequest, resetBus } from "../test/helpers.ts";

let nats: NatsHandle;
let admin: Bus;
let ca: TestCa;
const cleanups: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  nats = await startNats();
  admin = await connectBus(nats.url);
  ca = await createTestCa("DANE DNSSEC Test CA");
}, 60_000);
afterAll(async () => {
  await admin?.close();
  await nats?.stop();
  await ca?.remove();
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  await resetBus(admin);
});

/** Peers on `hosts`, an unbound serving `zones(port)` (TLSA names hold the peers' port), delivery with DANE=on. */
function setup(
  hosts: string[],
  options: Parameters<typeof startDaneDelivery>[2],
  zones: (port: number) => UnboundZone[],
) {
  return startDaneDelivery({ natsUrl: nats.url, admin, cleanups }, hosts, options, async (port) => {
    const unbound = await startUnbound({ zones: zones(port) });
    cleanups.push(() => unbound.stop());
    return unbound.address;
  });
}

describe("DANE with a validating unbound", () => {
  it("delivers when the signed TLSA record (3 1 1) matches the certificate; defers with 4.7.5 and sends nothing when it does not", async () => {
    const good = await ca.issue(["anything.example"]);
    const other = await ca.issue(["mx2.signed.test"]);
    const { peers, statuses, events } = await setup(
      ["127.0.0.2", "127.0.0.3"],
      (host) => ({ certificate: host === "127.0.0.2" ? good : other }),
      (port) => [
        {
          name: "signed.test",
          records: [
            "mx1 A 127.0.0.2",
            tlsaLine(`_${port}._tcp.mx1`, daneEe(good)),
            "mx2 A 127.0.0.3",
            tlsaLine(`_${port}._tcp.mx2`, daneEe(good)), // pins a key mx2 does not have
          ],
        },
      ],
    );
    await publishRequest(admin, {
      domain: "signed.test",
      hosts: [mx("mx1.signed.test", 10, "127.0.0.2")],
      recipients: ["bob@signed.test"],
      body: message("dane over dnssec", "bob@signed.test"),
    });
    await publishRequest(admin, {
      domain: "two.signed.test",
      hosts: [mx("mx2.signed.test", 10, "127.0.0.3")],
      recipients: ["carol@two.signed.test"],
      body: message("dane mismatch", "carol@two.signed.test"),
    });
    const [got] = await peers[0]!.waitForMessages(1);
    expect(got!.tls).toBe(true);
    const e = await events.waitFor("delivered", "bob@signed.test");
    expect(e.tls).toMatchObject({ policy: "dane", source: "dane", verified: true, cipher: got!.tlsCipher });
    const seen = await statuses.waitFor(2);
    expect(seen.find((s) => s.status.recipient === "bob@signed.test")!.status.outcome).toBe("delivered");
    const refused = seen.find((s) => s.status.recipient === "carol@two.signed.test")!.status;
    expect(refused).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(refused.reply.text).toMatch(/not verified \(dane\)/);
    expect(peers[1]!.messages).toHaveLength(0);
  });

  it("delivers under a signed DANE-TA record (2 1 1) to a host whose chain names it and whose certificate names the MX", async () => {
    const chained = await ca.issue(["mx.ta.test"], { chain: true });
    const wrongName = await ca.issue(["elsewhere.example"], { chain: true });
    const { peers, statuses, events } = await setup(
      ["127.0.0.2", "127.0.0.3"],
      (host) => ({ certificate: host === "127.0.0.2" ? chained : wrongName }),
      (port) => [
        {
          name: "ta.test",
          records: [
            "mx A 127.0.0.2",
            tlsaLine(`_${port}._tcp.mx`, daneTa(ca.cert)),
            "mx2 A 127.0.0.3",
            tlsaLine(`_${port}._tcp.mx2`, daneTa(ca.cert)),
          ],
        },
      ],
    );
    await publishRequest(admin, {
      domain: "ta.test",
      hosts: [mx("mx.ta.test", 10, "127.0.0.2")],
      recipients: ["bob@ta.test"],
      body: message("dane ta over dnssec", "bob@ta.test"),
    });
    await publishRequest(admin, {
      domain: "two.ta.test",
      hosts: [mx("mx2.ta.test", 10, "127.0.0.3")],
      recipients: ["erin@two.ta.test"],
      body: message("dane ta wrong name", "erin@two.ta.test"),
    });
    await peers[0]!.waitForMessages(1);
    const e = await events.waitFor("delivered", "bob@ta.test");
    expect(e.tls).toMatchObject({ policy: "dane", source: "dane", verified: true });
    const seen = await statuses.waitFor(2);
    // DANE-TA checks the name (RFC 7672 3.2.2): the CA's signature alone is not enough
    const wrong = seen.find((s) => s.status.recipient === "erin@two.ta.test")!.status;
    expect(wrong).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(peers[1]!.messages).toHaveLength(0);
  });

  it("defers with 4.7.5 and never connects when the zone is bogus: a TLSA record swapped after signing, or expired signatures", async () => {
    const cert = await ca.issue(["mx.forged.test"]);
    const { peers, statuses } = await setup(
      ["127.0.0.2", "127.0.0.3"],
      () => ({ certificate: cert }),
      (port) => [
        {
          name: "forged.test",
          records: ["mx A 127.0.0.2", `_${port}._tcp.mx TLSA 3 1 1 ${"00".repeat(32)}`],
          // the substitute matches the peer's key: only the failed signature stops the delivery
          forged: [tlsaLine(`_${port}._tcp.mx`, daneEe(cert))],
        },
        {
          name: "expired.test",
          records: ["mx A 127.0.0.3", tlsaLine(`_${port}._tcp.mx`, daneEe(cert))],
          dnssec: "expired",
        },
      ],
    );
    await publishRequest(admin, {
      domain: "forged.test",
      hosts: [mx("mx.forged.test", 10, "127.0.0.2")],
      recipients: ["bob@forged.test"],
      body: message("forged tlsa", "bob@forged.test"),
    });
    await publishRequest(admin, {
      domain: "expired.test",
      hosts: [mx("mx.expired.test", 10, "127.0.0.3")],
      recipients: ["dave@expired.test"],
      body: message("expired signatures", "dave@expired.test"),
    });
    const seen = await statuses.waitFor(2, 60_000);
    const forged = seen.find((s) => s.status.recipient === "bob@forged.test")!.status;
    expect(forged).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(forged.reply.text).toMatch(/DANE TLSA lookup for mx\.forged\.test failed: SERVFAIL/);
    const expired = seen.find((s) => s.status.recipient === "dave@expired.test")!.status;
    expect(expired).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(expired.reply.text).toMatch(/DANE TLSA lookup for mx\.expired\.test failed/);
    expect(peers.map((p) => p.connections)).toEqual([0, 0]);
  });

  it("uses no DANE for an unsigned zone (no trust anchor): TLSA records there are ignored and TLS stays opportunistic", async () => {
    const cert = await ca.issue(["mx.plain.test"]);
    const { peers, events } = await setup(
      ["127.0.0.2"],
      () => ({ starttls: true }),
      (port) => [
        {
          name: "plain.test",
          records: ["mx A 127.0.0.2", tlsaLine(`_${port}._tcp.mx`, daneEe(cert))], // does not match
          dnssec: "unsigned",
        },
      ],
    );
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
});
