import { X509Certificate } from "node:crypto";
import { writeFile } from "node:fs/promises";
import path from "node:path";
import {
  type CertPair,
  createSelfSignedCert,
  type NatsHandle,
  startNats,
  type TempDir,
  tempDir,
  waitFor,
} from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type EdgeHarness, type HarnessOptions, startEdge } from "../test/harness.ts";
import type { RawSmtp } from "../test/raw-smtp.ts";

let nats: NatsHandle;
let dir: TempDir;
let first: CertPair;
let second: CertPair;
let files: { certFile: string; keyFile: string };
const open: EdgeHarness[] = [];
const clients: RawSmtp[] = [];

beforeAll(async () => {
  [nats, dir, first, second] = await Promise.all([
    startNats(),
    tempDir("smtp-edge-tls"),
    createSelfSignedCert({ hostnames: ["mx.test", "127.0.0.1"] }),
    createSelfSignedCert({ hostnames: ["mx.test", "renewed.mx.test"] }),
  ]);
  files = { certFile: path.join(dir.path, "tls.crt"), keyFile: path.join(dir.path, "tls.key") };
  await writeFile(files.certFile, first.cert);
  await writeFile(files.keyFile, first.key);
});
afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await Promise.all(open.splice(0).map((h) => h.close()));
});
afterAll(async () => {
  await nats?.stop();
  await dir?.remove();
});

async function edge(opts: HarnessOptions): Promise<EdgeHarness> {
  const h = await startEdge(nats.url, opts);
  open.push(h);
  return h;
}
async function client(h: EdgeHarness, opts: { tls?: boolean } = {}): Promise<RawSmtp> {
  const c = await h.connect(opts);
  clients.push(c);
  return c;
}
const fingerprint = (pem: string) => new X509Certificate(pem).fingerprint256;

async function sendOne(c: RawSmtp, from = "a@remote.test"): Promise<string> {
  expect((await c.command(`MAIL FROM:<${from}>`)).code).toBe(250);
  expect((await c.command("RCPT TO:<alice@example.test>")).code).toBe(250);
  expect((await c.command("DATA")).code).toBe(354);
  c.write("Subject: tls\r\n\r\nx\r\n.\r\n");
  const r = await c.read();
  expect(r.code).toBe(250);
  return /queued as (\S+)$/.exec(r.text)![1]!;
}

async function storedBody(h: EdgeHarness, queueId: string): Promise<string> {
  const q = await waitFor(() => h.queued.find((m) => m.queueId === queueId), { timeoutMs: 5000 });
  return (await h.body(q)).toString();
}

describe("STARTTLS", () => {
  it("is not offered without certificate files, and a warning says so", async () => {
    const h = await edge({});
    const c = await client(h);
    const ehlo = await c.command("EHLO client.test");
    expect(ehlo.lines.join("\n")).not.toContain("STARTTLS");
    expect(ehlo.lines.join("\n")).not.toMatch(/REQUIRETLS|AUTH/);
    for (const ext of ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]) {
      expect(ehlo.lines.map((l) => l.slice(4))).toContain(ext);
    }
    expect((await c.command("STARTTLS")).code).toBeGreaterThanOrEqual(500);
    expect(h.logs.some((l) => l.includes('"level":"warn"') && l.includes("STARTTLS is not offered"))).toBe(
      true,
    );
  });

  it("is offered with the certificate from the files, and the Received field says ESMTPS", async () => {
    const h = await edge({ tls: files });
    const c = await client(h);
    expect((await c.command("EHLO client.test")).lines.map((l) => l.slice(4))).toContain("STARTTLS");
    const cert = await c.starttls("mx.test");
    expect(cert.fingerprint256).toBe(fingerprint(first.cert));
    await c.command("EHLO client.test");
    const queueId = await sendOne(c);
    const body = await storedBody(h, queueId);
    expect(body).toMatch(
      /^Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\t\(using TLSv1\.[23] with cipher \S+\)\r\n\tby mx\.test \(mailpipe\) with ESMTPS id/,
    );
    expect(h.queued.find((q) => q.queueId === queueId)?.client?.tls).toBe(true);
  });

  it("picks up renewed certificate files without a restart", async () => {
    const h = await edge({ tls: files, tlsPollIntervalMs: 100 });
    try {
      await writeFile(files.certFile, second.cert);
      await writeFile(files.keyFile, second.key);
      await waitFor(() => h.logs.some((l) => l.includes("TLS certificate reloaded")), { timeoutMs: 5000 });
      const c = await client(h);
      await c.command("EHLO client.test");
      expect((await c.starttls("mx.test")).fingerprint256).toBe(fingerprint(second.cert));
    } finally {
      await writeFile(files.certFile, first.cert);
      await writeFile(files.keyFile, first.key);
    }
  });

  it("serves implicit TLS from the first byte in secure mode", async () => {
    const h = await edge({ tls: files, secure: true });
    const c = await client(h, { tls: true });
    expect(c.greeting.code).toBe(220);
    const ehlo = await c.command("EHLO client.test");
    expect(ehlo.lines.join("\n")).not.toContain("STARTTLS");
    const body = await storedBody(h, await sendOne(c));
    expect(body).toMatch(/with ESMTPS id/);
  });

  it("refuses to start in secure mode without certificate files", async () => {
    await expect(startEdge(nats.url, { secure: true })).rejects.toThrow(/TLS_CERT_FILE/);
  });
});

describe("AUTH (for submission)", () => {
  const auth = {
    auth: ({ username, password }: { username: string; password: string }) =>
      username === "alice@example.test" && password === "s3cret" ? username : undefined,
  };

  it("needs STARTTLS first, then checks credentials with the hook; Received says ESMTPSA", async () => {
    const h = await edge({ tls: files, service: "msa", hooks: auth });
    const c = await client(h);
    expect((await c.command("EHLO client.test")).lines.join("\n")).toContain("AUTH PLAIN LOGIN");
    expect(
      await c.command(`AUTH PLAIN ${Buffer.from("\0alice@example.test\0s3cret").toString("base64")}`),
    ).toMatchObject({
      code: 538,
    });
    await c.starttls();
    await c.command("EHLO client.test");
    expect(await c.command("MAIL FROM:<alice@example.test>")).toMatchObject({ code: 530, enhanced: "5.7.0" });
    expect(
      await c.command(`AUTH PLAIN ${Buffer.from("\0alice@example.test\0wrong").toString("base64")}`),
    ).toMatchObject({
      code: 535,
      enhanced: "5.7.8",
    });
    expect(
      await c.command(`AUTH PLAIN ${Buffer.from("\0alice@example.test\0s3cret").toString("base64")}`),
    ).toMatchObject({
      code: 235,
      enhanced: "2.7.0",
    });
    const queueId = await sendOne(c, "alice@example.test");
    expect(await storedBody(h, queueId)).toMatch(/with ESMTPSA id/);
    const q = h.queued.find((m) => m.queueId === queueId)!;
    expect(q.source).toBe("msa");
    expect(q.client?.user).toBe("alice@example.test");
  });

  it("can leave the client's address out of the Received field", async () => {
    const h = await edge({ tls: files, service: "msa", hooks: auth, hideClientInReceived: true });
    const c = await client(h);
    await c.command("EHLO client.test");
    await c.starttls();
    await c.command("EHLO client.test");
    await c.command(`AUTH PLAIN ${Buffer.from("\0alice@example.test\0s3cret").toString("base64")}`);
    const body = await storedBody(h, await sendOne(c, "alice@example.test"));
    const received = body.slice(0, body.indexOf("Subject:"));
    expect(received).not.toContain("127.0.0.1");
    expect(received).not.toContain("client.test");
    expect(received).toMatch(/^Received: \(using TLS/);
  });
});

describe("PROXY protocol", () => {
  it("sees the client address from the PROXY header and limits connections by it", async () => {
    const h = await edge({ useProxy: true, maxConnectionsPerIp: 1 });
    const via = async (ip: string) => {
      const c = await h.connect({ proxyHeader: `PROXY TCP4 ${ip} 127.0.0.1 40000 25` });
      clients.push(c);
      return c;
    };
    const a = await via("198.51.100.7");
    expect(a.greeting.code).toBe(220);
    expect((await via("198.51.100.7")).greeting).toMatchObject({ code: 421, enhanced: "4.7.0" });
    expect((await via("198.51.100.8")).greeting.code).toBe(220);
    await a.command("EHLO client.test");
    const queueId = await sendOne(a);
    expect(await storedBody(h, queueId)).toMatch(/^Received: from client\.test \(\[198\.51\.100\.7\]\)/);
    expect(h.queued.find((q) => q.queueId === queueId)?.client?.ip).toBe("198.51.100.7");
  });
});
