// The validating unbound of the DANE tests: secure answers carry AD, bogus ones are SERVFAIL, an
// unsigned zone is insecure, and it never asks anyone outside its zones.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startUnbound, type UnboundHandle } from "./unbound.ts";

const HASH = "0123456789abcdef".repeat(4);
const OTHER = "fedcba9876543210".repeat(4);

describe("startUnbound", () => {
  let unbound: UnboundHandle;

  beforeAll(async () => {
    unbound = await startUnbound({
      zones: [
        { name: "signed.test", records: ["mx A 127.0.0.2", `_25._tcp.mx TLSA 3 1 1 ${HASH}`] },
        {
          name: "forged.test",
          records: ["mx A 127.0.0.2", `_25._tcp.mx TLSA 3 1 1 ${HASH}`],
          forged: [`_25._tcp.mx TLSA 3 1 1 ${OTHER}`],
        },
        { name: "expired.test", records: ["mx A 127.0.0.2"], dnssec: "expired" },
        { name: "plain.test", records: ["mx A 127.0.0.2"], dnssec: "unsigned" },
      ],
    });
  }, 60_000);
  afterAll(() => unbound?.stop());

  it("listens on loopback and gives an address usable as DANE_RESOLVERS", () => {
    expect(unbound.address).toBe(`127.0.0.1:${unbound.port}`);
    expect(unbound.pid).toBeGreaterThan(0);
  });

  it("validates a signed zone against its trust anchor: answers carry AD, a missing name is an authenticated NXDOMAIN", async () => {
    const a = await unbound.query("mx.signed.test", "A");
    expect(a).toMatchObject({ rcode: "NOERROR", authenticated: true });
    expect(a.answers).toMatchObject([{ type: "A", data: "127.0.0.2" }]);
    const tlsa = await unbound.query("_25._tcp.mx.signed.test", "TLSA");
    expect(tlsa).toMatchObject({ rcode: "NOERROR", authenticated: true });
    expect(tlsa.answers[0]).toMatchObject({
      type: "TLSA",
      data: { usage: 3, selector: 1, matchingType: 1 },
    });
    expect(await unbound.query("nothing.signed.test", "A")).toMatchObject({
      rcode: "NXDOMAIN",
      authenticated: true,
    });
  });

  it("answers SERVFAIL for a record changed after signing, and still validates the rest of that zone", async () => {
    expect(await unbound.query("_25._tcp.mx.forged.test", "TLSA")).toMatchObject({
      rcode: "SERVFAIL",
      authenticated: false,
      answers: [],
    });
    expect(unbound.log()).toMatch(/validation failure <_25\._tcp\.mx\.forged\.test\. TLSA IN>/);
    expect(await unbound.query("mx.forged.test", "A")).toMatchObject({
      rcode: "NOERROR",
      authenticated: true,
    });
  });

  it("answers SERVFAIL for a zone whose signatures expired", async () => {
    expect(await unbound.query("mx.expired.test", "A", 20_000)).toMatchObject({
      rcode: "SERVFAIL",
      answers: [],
    });
  });

  it("answers an unsigned zone without a trust anchor as insecure: data, no AD", async () => {
    const a = await unbound.query("mx.plain.test", "A");
    expect(a).toMatchObject({ rcode: "NOERROR", authenticated: false });
    expect(a.answers).toMatchObject([{ type: "A", data: "127.0.0.2" }]);
  });

  it("asks nobody outside its own zones", async () => {
    expect(await unbound.query("example.com", "A")).toMatchObject({ rcode: "SERVFAIL", answers: [] });
  });

  it("stops by its PID and leaves nothing listening", async () => {
    const other = await startUnbound({ zones: [{ name: "gone.test", records: [] }] });
    const pid = other.pid!;
    await other.stop();
    expect(() => process.kill(pid, 0)).toThrow();
    await expect(other.query("gone.test", "SOA", 300)).rejects.toThrow(/no answer/);
  });
});
