import { createPrivateKey, X509Certificate } from "node:crypto";
import tls from "node:tls";
import { describe, expect, it } from "vitest";
import { type CertPair, createSelfSignedCert, createSelfSignedCertWithOpenssl, createTestCa } from "./tls.ts";

const DAY = 86_400_000;

function checkPair(pair: CertPair, days: number): void {
  const cert = new X509Certificate(pair.cert);
  expect(cert.subject).toBe("CN=mx.dest.test");
  expect(cert.checkHost("mx.dest.test")).toBe("mx.dest.test");
  expect(cert.checkHost("localhost")).toBe("localhost");
  expect(cert.checkHost("other.test")).toBeUndefined();
  expect(cert.checkIP("127.0.0.2")).toBe("127.0.0.2");
  expect(cert.checkPrivateKey(createPrivateKey(pair.key))).toBe(true);
  expect(cert.ca).toBe(false);
  const validFor = Date.parse(cert.validTo) - Date.now();
  expect(validFor).toBeGreaterThan((days - 1) * DAY);
  expect(validFor).toBeLessThan((days + 1) * DAY);
}

/** A TLS handshake with the pair as server identity, verified against the cert itself. */
async function handshake(pair: CertPair, servername: string): Promise<boolean> {
  const server = tls.createServer({ key: pair.key, cert: pair.cert }, (socket) => socket.end());
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  try {
    return await new Promise((resolve, reject) => {
      const socket = tls.connect({ host: "127.0.0.1", port, servername, ca: [pair.cert] }, () => {
        resolve(socket.authorized);
        socket.destroy();
      });
      socket.once("error", reject);
    });
  } finally {
    server.close();
  }
}

describe("createSelfSignedCert", () => {
  it("makes a PEM key and certificate for the given names and IPs", async () => {
    const pair = await createSelfSignedCert({
      hostnames: ["mx.dest.test", "localhost", "127.0.0.2"],
      days: 30,
    });
    expect(pair.key).toMatch(/^-----BEGIN (RSA )?PRIVATE KEY-----/);
    expect(pair.cert).toMatch(/^-----BEGIN CERTIFICATE-----/);
    checkPair(pair, 30);
    expect(await handshake(pair, "mx.dest.test")).toBe(true);
    await expect(handshake(pair, "other.test")).rejects.toThrow(/altnames/i);
  });

  it("defaults to a year", async () => {
    const pair = await createSelfSignedCert({ hostnames: ["mx.dest.test", "localhost", "127.0.0.2"] });
    checkPair(pair, 365);
  });

  it("needs at least one hostname", async () => {
    await expect(createSelfSignedCert({ hostnames: [] })).rejects.toThrow(/at least one hostname/);
  });

  it("makes the same kind of certificate with the openssl CLI (the fallback)", async () => {
    const pair = await createSelfSignedCertWithOpenssl({
      hostnames: ["mx.dest.test", "localhost", "127.0.0.2"],
      days: 7,
    });
    checkPair(pair, 7);
    expect(await handshake(pair, "localhost")).toBe(true);
  });
});

describe("createTestCa", () => {
  it("issues certificates that verify against the CA for their names only, with the chain on request", async () => {
    const ca = await createTestCa();
    try {
      const root = new X509Certificate(ca.cert);
      expect(root.ca).toBe(true);
      const pair = await ca.issue(["mx.ca.test", "127.0.0.9"], { chain: true });
      const leaf = new X509Certificate(pair.cert);
      expect(leaf.verify(root.publicKey)).toBe(true);
      expect(leaf.checkHost("mx.ca.test")).toBe("mx.ca.test");
      expect(leaf.checkIP("127.0.0.9")).toBe("127.0.0.9");
      expect(leaf.checkHost("other.ca.test")).toBeUndefined();
      expect(leaf.checkPrivateKey(createPrivateKey(pair.key))).toBe(true);
      expect(pair.cert.match(/BEGIN CERTIFICATE/g)).toHaveLength(2);
      const other = await createTestCa("Other CA");
      expect(leaf.verify(new X509Certificate(other.cert).publicKey)).toBe(false);
      await other.remove();
    } finally {
      await ca.remove();
    }
  });
});
