import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { RawSmtp } from "@mailpipe/smtp-edge/testing";
import nodemailer from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  DKIM_SELECTOR,
  type InProcessMx,
  type MxEnvironment,
  queueIdOf,
  startEnvironment,
  startInProcess,
} from "../test/harness.ts";

let e: MxEnvironment;
let mx: InProcessMx;

beforeAll(async () => {
  e = await startEnvironment();
  mx = await startInProcess(e);
});
afterAll(async () => {
  await mx?.close();
  await e?.stop();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The message as nodemailer composes (and, with a key, DKIM-signs) it, CRLF line endings. */
async function compose(opts: { from: string; to: string; subject: string; sign?: boolean }): Promise<Buffer> {
  const builder = nodemailer.createTransport({
    streamTransport: true,
    buffer: true,
    newline: "windows",
    ...(opts.sign
      ? { dkim: { domainName: "sender.test", keySelector: DKIM_SELECTOR, privateKey: e.dkimKey } }
      : {}),
  });
  const info = await builder.sendMail({
    from: opts.from,
    to: opts.to,
    subject: opts.subject,
    text: "Hello from the test.\r\n.leading dot line\r\nbye\r\n",
  });
  const raw = info.message as Buffer;
  return raw.subarray(-2).toString() === "\r\n" ? raw : Buffer.concat([raw, Buffer.from("\r\n")]);
}

function smtp(localAddress?: string, extra: Record<string, unknown> = {}) {
  return nodemailer.createTransport({
    host: "127.0.0.1",
    port: mx.port,
    secure: false,
    ignoreTLS: true,
    name: "client.test",
    ...(localAddress ? { localAddress } : {}),
    ...extra,
  });
}

async function send(raw: Buffer, from: string, to: string, localAddress?: string) {
  const t = smtp(localAddress);
  try {
    return await t.sendMail({ envelope: { from, to: [to] }, raw });
  } finally {
    t.close();
  }
}

/** The prepended header fields of a stored body and what follows them. */
function split(stored: string, original: Buffer): { prefix: string; rest: string } {
  const at = stored.length - original.length;
  return { prefix: stored.slice(0, at), rest: stored.slice(at) };
}

describe("authentication checks", () => {
  it("queues a DKIM-signed message that passes SPF and DMARC, with Received + Authentication-Results + the original bytes", async () => {
    const raw = await compose({
      from: "news@sender.test",
      to: "alice@example.test",
      subject: "signed",
      sign: true,
    });
    expect(raw.toString()).toContain("DKIM-Signature:");
    const info = await send(raw, "news@sender.test", "alice@example.test");
    expect(info.response).toMatch(/^250 2\.0\.0 OK: queued as /);
    const queueId = queueIdOf(info.response);

    const stored = await mx.body(queueId);
    const { prefix, rest } = split(stored, raw);
    expect(rest).toBe(raw.toString("latin1"));
    expect(prefix).toMatch(
      new RegExp(
        `^Received: from client\\.test \\(\\[127\\.0\\.0\\.1\\]\\)\\r\\n\\tby mx\\.test \\(mailpipe\\) with ESMTP id ${queueId}\\r\\n\\tfor <alice@example\\.test>; [^\\r\\n]+\\r\\nAuthentication-Results: mx\\.test;`,
      ),
    );
    const ar = prefix.slice(prefix.indexOf("Authentication-Results:"));
    expect(ar).toMatch(/dkim=pass header\.i=@sender\.test header\.s=s1/);
    expect(ar).toMatch(/spf=pass/);
    expect(ar).toMatch(/dmarc=pass/);
    expect(ar.endsWith("\r\n")).toBe(true);
    expect(prefix.match(/^[A-Za-z-]+:/gm)).toEqual(["Received:", "Authentication-Results:"]);

    const q = mx.queued.find((m) => m.queueId === queueId)!;
    expect(q).toMatchObject({
      source: "mx",
      envelope: { mailFrom: "news@sender.test", rcptTo: [{ address: "alice@example.test" }] },
      client: { ip: "127.0.0.1", helo: "client.test", tls: false },
    });
    expect(q.messageId).toMatch(/^<.+>$/);
  });

  it("accepts an SPF failure from 127.0.0.5 when the sender's DMARC says p=none", async () => {
    const raw = await compose({
      from: "info@none.test",
      to: "alice@example.test",
      subject: "spf fail, p=none",
    });
    const info = await send(raw, "info@none.test", "alice@example.test", "127.0.0.5");
    const stored = await mx.body(queueIdOf(info.response));
    const { prefix, rest } = split(stored, raw);
    expect(rest).toBe(raw.toString("latin1"));
    expect(prefix).toContain("[127.0.0.5]");
    expect(prefix).toMatch(/spf=fail/);
    expect(prefix).toMatch(/dmarc=fail/);
  });

  it("refuses a DMARC failure with 550 5.7.1 when the sender says p=reject, and queues nothing", async () => {
    const before = mx.queued.length;
    const raw = await compose({ from: "ceo@reject.test", to: "alice@example.test", subject: "spoofed" });
    const err = (await send(raw, "ceo@reject.test", "alice@example.test", "127.0.0.5").catch(
      (x: unknown) => x,
    )) as {
      responseCode?: number;
      response?: string;
    };
    expect(err.responseCode).toBe(550);
    expect(err.response).toMatch(/^550 5\.7\.1 Message rejected: DMARC policy of reject\.test says reject/);
    // the same message to a domain that does not enforce DMARC is accepted
    const ok = await send(raw, "ceo@reject.test", "dave@lenient.test", "127.0.0.5");
    const queueId = queueIdOf(ok.response);
    await mx.body(queueId);
    expect(mx.queued.slice(before).map((q) => q.queueId)).toEqual([queueId]);
  });

  it("refuses an SPF hard fail at RCPT for domains that ask for it (550 5.7.23), not for others", async () => {
    const c = await RawSmtp.connect({ port: mx.port, localAddress: "127.0.0.5" });
    await c.command("EHLO client.test");
    expect((await c.command("MAIL FROM:<info@none.test>")).code).toBe(250);
    expect(await c.command("RCPT TO:<carol@strict.test>")).toMatchObject({
      code: 550,
      enhanced: "5.7.23",
      text: "SPF check failed for none.test: your IP is not allowed",
    });
    expect((await c.command("RCPT TO:<alice@example.test>")).code).toBe(250);
    await c.command("QUIT");
    c.close();
    // from an address SPF allows, the strict domain takes the mail
    const ok = await RawSmtp.connect({ port: mx.port });
    await ok.command("EHLO client.test");
    await ok.command("MAIL FROM:<info@none.test>");
    expect((await ok.command("RCPT TO:<carol@strict.test>")).code).toBe(250);
    ok.close();
  });

  it("never refuses permanently because of a DNS temperror", async () => {
    // SPF temperror + DMARC p=reject fails DMARC: 451 4.4.3 (try again), not 550
    const flaky = await compose({ from: "x@flaky.test", to: "alice@example.test", subject: "spf temperror" });
    const err = (await send(flaky, "x@flaky.test", "alice@example.test").catch((x: unknown) => x)) as {
      responseCode?: number;
      response?: string;
    };
    expect(err.response).toMatch(/^451 4\.4\.3 /);
    // the DMARC lookup itself failing: accepted, and the header says temperror
    const temp = await compose({
      from: "x@tempdmarc.test",
      to: "alice@example.test",
      subject: "dmarc temperror",
    });
    const info = await send(temp, "x@tempdmarc.test", "alice@example.test", "127.0.0.5");
    expect(await mx.body(queueIdOf(info.response))).toMatch(/dmarc=temperror/);
    // SPF temperror at MAIL FROM does not refuse recipients of a domain that refuses SPF fails
    const c = await RawSmtp.connect({ port: mx.port });
    await c.command("EHLO client.test");
    await c.command("MAIL FROM:<x@flaky.test>");
    expect((await c.command("RCPT TO:<carol@strict.test>")).code).toBe(250);
    c.close();
  });

  it("delivers what swaks sends", async () => {
    const before = mx.queued.length;
    const { stdout } = await promisify(execFile)(
      "swaks",
      [
        "--server",
        `127.0.0.1:${mx.port}`,
        "--to",
        "alice@example.test",
        "--from",
        "x@sender.test",
        "--helo",
        "swaks.test",
        "--body",
        "sent by swaks",
      ],
      { timeout: 20_000 },
    );
    const line = stdout.split("\n").find((l) => l.includes("queued as"));
    expect(line).toMatch(/<- {1,2}250 2\.0\.0 OK: queued as/);
    const stored = await mx.body(queueIdOf(line!));
    expect(stored).toContain("sent by swaks");
    expect(stored).toMatch(/spf=pass/);
    expect(mx.queued.length).toBe(before + 1);
  });
});

describe("recipient policy on the wire", () => {
  it("answers each relay trick, unknown user and malformed address with its exact code, and queues nothing", async () => {
    const before = mx.queued.length;
    const c = await RawSmtp.connect({ port: mx.port });
    await c.command("EHLO client.test");
    expect((await c.command("MAIL FROM:<>")).code).toBe(250);
    const cases: [string, number, string][] = [
      ["<bob@other.test>", 550, "5.7.1"],
      ["<user%other.test@example.test>", 550, "5.7.1"],
      ["<user!other.test@example.test>", 550, "5.7.1"],
      ['<"user@other.test"@example.test>', 550, "5.7.1"],
      ["<@example.test:user@other.test>", 550, "5.7.1"],
      ["<user@[127.0.0.1]>", 550, "5.7.1"],
      ["<nobody@example.test>", 550, "5.1.1"],
      ["<alice@@example.test>", 501, "5.1.3"],
      ["<alice example.test>", 501, "5.1.3"],
      ["alice@example.test", 501, "5.1.3"],
    ];
    for (const [rcpt, code, enhanced] of cases) {
      const r = await c.command(`RCPT TO:${rcpt}`);
      expect({ rcpt, code: r.code, enhanced: r.enhanced }).toEqual({ rcpt, code, enhanced });
    }
    expect(await c.command("DATA")).toMatchObject({ code: 503 });
    await c.command("QUIT");
    c.close();
    await sleep(200);
    expect(mx.queued.length).toBe(before);
  });

  it("accepts aliases, plus-addresses, a source route to a local user and a domainless postmaster", async () => {
    const c = await RawSmtp.connect({ port: mx.port });
    await c.command("EHLO client.test");
    await c.command("MAIL FROM:<>");
    for (const rcpt of [
      "<team@example.test>",
      "<alice+news@example.test>",
      "<@other.test:bob@example.test>",
      "<postmaster>",
    ]) {
      expect((await c.command(`RCPT TO:${rcpt}`)).code, rcpt).toBe(250);
    }
    await c.command("DATA");
    c.write("From: MAILER-DAEMON@remote.test\r\nSubject: bounce\r\n\r\nx\r\n.\r\n");
    const r = await c.read();
    expect(r.code).toBe(250);
    c.close();
    await mx.body(queueIdOf(r.text));
    expect(mx.queued.find((q) => q.queueId === queueIdOf(r.text))?.envelope).toMatchObject({
      mailFrom: "",
      rcptTo: [
        { address: "team@example.test" },
        { address: "alice+news@example.test" },
        { address: "bob@example.test" },
        { address: "postmaster@example.test" },
      ],
    });
  });

  it("refuses an oversized message with 552 5.3.4 and the recipient over the limit with 452 4.5.3", async () => {
    const before = mx.queued.length;
    const c = await RawSmtp.connect({ port: mx.port });
    const ehlo = await c.command("EHLO client.test");
    expect(ehlo.lines.map((l) => l.slice(4))).toContain("SIZE 65536");
    await c.command("MAIL FROM:<x@sender.test>");
    for (let i = 1; i <= 5; i++)
      expect((await c.command(`RCPT TO:<alice+${i}@example.test>`)).code).toBe(250);
    expect(await c.command("RCPT TO:<alice+6@example.test>")).toMatchObject({ code: 452, enhanced: "4.5.3" });
    await c.command("DATA");
    c.write(`Subject: big\r\n\r\n${"x".repeat(998)}\r\n`.repeat(70));
    c.write(".\r\n");
    expect(await c.read()).toMatchObject({ code: 552, enhanced: "5.3.4" });
    c.close();
    await sleep(200);
    expect(mx.queued.length).toBe(before);
  });
});

describe("STARTTLS", () => {
  it("is offered with the configured certificate and the Received field says ESMTPS", async () => {
    const t = smtp(undefined, { ignoreTLS: false, requireTLS: true, tls: { rejectUnauthorized: false } });
    const raw = await compose({
      from: "news@sender.test",
      to: "bob@example.test",
      subject: "over tls",
      sign: true,
    });
    const info = await t.sendMail({ envelope: { from: "news@sender.test", to: ["bob@example.test"] }, raw });
    t.close();
    const stored = await mx.body(queueIdOf(info.response));
    expect(stored).toMatch(
      /^Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\t\(using TLSv1\.3 with cipher [A-Z0-9_]+\)\r\n\tby mx\.test \(mailpipe\) with ESMTPS id /,
    );
    expect(stored).toMatch(/dkim=pass/);
  });
});
