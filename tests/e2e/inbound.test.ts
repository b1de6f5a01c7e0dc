// Inbound mail end to end: mx → router → mda → Maildir, with real processes, real DNS and real SMTP.
import { execFile } from "node:child_process";
import { generateKeyPairSync, randomBytes } from "node:crypto";
import { connect, type Socket } from "node:net";
import { promisify } from "node:util";
import { hashPassword } from "@mailpipe/directory";
import { waitFor } from "@mailpipe/testing";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { headersOf, type Pipeline, startPipeline } from "./harness.ts";

const run = promisify(execFile);
const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
const dkimPem = privateKey.export({ type: "pkcs8", format: "pem" }).toString();
const dkimTxt = `v=DKIM1; k=rsa; p=${publicKey.export({ type: "spki", format: "der" }).toString("base64")}`;

let p: Pipeline;

async function directory(): Promise<string> {
  const pw = await hashPassword("unused-password-1234");
  const users = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"]
    .map((u) => `  ${u}@example.test:\n    password: "${pw}"`)
    .join("\n");
  return `domains:
  example.test: {}
users:
${users}
aliases:
  postmaster@example.test: [alice@example.test]
  crew@example.test: [frank@example.test, grace@example.test]
`;
}

beforeAll(async () => {
  p = await startPipeline({
    services: ["mda", "router", "mx"],
    directory: await directory(),
    dns: {
      "sender.test": {
        TXT: ["v=spf1 ip4:127.0.0.1 -all"],
        MX: [{ exchange: "mx.sender.test", priority: 10 }],
      },
      "mx.sender.test": { A: ["127.0.0.9"] },
      "_dmarc.sender.test": { TXT: ["v=DMARC1; p=none"] },
      "s1._domainkey.sender.test": { TXT: [dkimTxt] },
      "strict.test": { TXT: ["v=spf1 ip4:127.0.0.1 -all"] },
      "_dmarc.strict.test": { TXT: ["v=DMARC1; p=reject"] },
    },
  });
}, 120_000);

afterAll(async () => {
  await p?.stop();
});

function transport(opts: { localAddress?: string; pool?: boolean; maxConnections?: number } = {}) {
  return nodemailer.createTransport({
    host: "127.0.0.1",
    port: p.ports.mx,
    secure: false,
    tls: { rejectUnauthorized: false },
    name: "client.sender.test",
    ...(opts.localAddress ? { localAddress: opts.localAddress } : {}),
    ...(opts.pool ? { pool: true, maxConnections: opts.maxConnections ?? 5, maxMessages: 1000 } : {}),
  } as TransportOptions);
}

/** What the client sent, exactly: nodemailer's raw message bytes. */
function rawMessage(subject: string, extra = ""): Buffer {
  return Buffer.from(
    [
      "From: Sender <someone@sender.test>",
      "To: alice@example.test",
      `Subject: ${subject}`,
      `Message-ID: <${randomBytes(8).toString("hex")}@sender.test>`,
      "Date: Mon, 23 Nov 2026 10:02:00 +0000",
      "MIME-Version: 1.0",
      "Content-Type: text/plain; charset=utf-8",
      "Content-Transfer-Encoding: 8bit",
      "",
      `Hello Alice, ünïcödé body line.${extra}`,
      "Second line.",
      "",
    ].join("\r\n"),
  );
}

/** The Maildir copy: Return-Path, Delivered-To, our Received + Authentication-Results, then the original bytes. */
function originalPart(stored: Buffer, original: Buffer): boolean {
  return stored.subarray(stored.length - original.length).equals(original);
}

async function waitForMail(address: string, count: number, timeoutMs = 20_000) {
  return waitFor(
    async () => {
      const files = await p.mailbox(address);
      return files.length >= count ? files : false;
    },
    { timeoutMs, message: `${address} did not receive ${count} message(s)` },
  );
}

describe("inbound: mx → router → mda", () => {
  it("delivers a DKIM-signed message byte-exact with dkim=pass spf=pass dmarc=pass", async () => {
    const raw = rawMessage("signed");
    const signed = await nodemailer
      .createTransport({
        streamTransport: true,
        buffer: true,
        dkim: { domainName: "sender.test", keySelector: "s1", privateKey: dkimPem },
      } as TransportOptions)
      .sendMail({ envelope: { from: "someone@sender.test", to: ["alice@example.test"] }, raw });
    const signedBytes = (signed as unknown as { message: Buffer }).message;
    const info = await transport().sendMail({
      envelope: { from: "someone@sender.test", to: ["alice@example.test"] },
      raw: signedBytes,
    });
    expect(info.response).toMatch(/^250 /);

    const [file] = await waitForMail("alice@example.test", 1);
    const content = file!.content;
    expect(originalPart(content, signedBytes)).toBe(true);
    const headers = headersOf(content);
    expect(headers[0]).toEqual({ name: "Return-Path", value: "<someone@sender.test>" });
    expect(headers[1]).toEqual({ name: "Delivered-To", value: "alice@example.test" });
    const ar = headers.find((h) => h.name.toLowerCase() === "authentication-results")!.value;
    expect(ar).toMatch(/^mail\.example\.test;/);
    expect(ar).toMatch(/dkim=pass/);
    expect(ar).toMatch(/spf=pass/);
    expect(ar).toMatch(/dmarc=pass/);
    expect(headers.some((h) => h.name === "Received" && h.value.includes("by mail.example.test"))).toBe(true);
  });

  it("labels spf=fail when the client IP is not allowed, and still delivers under p=none", async () => {
    const raw = rawMessage("from the wrong IP");
    const info = await transport({ localAddress: "127.0.0.5" }).sendMail({
      envelope: { from: "someone@sender.test", to: ["bob@example.test"] },
      raw,
    });
    expect(info.response).toMatch(/^250 /);
    const [file] = await waitForMail("bob@example.test", 1);
    const ar = headersOf(file!.content).find((h) => h.name.toLowerCase() === "authentication-results")!.value;
    expect(ar).toMatch(/spf=fail/);
    expect(originalPart(file!.content, raw)).toBe(true);
  });

  it("delivers what swaks sends", async () => {
    const { stdout } = await run("swaks", [
      "--server",
      `127.0.0.1:${p.ports.mx}`,
      "--from",
      "someone@sender.test",
      "--to",
      "carol@example.test",
      "--header",
      "Subject: sent with swaks",
      "--body",
      "hello from swaks",
    ]);
    expect(stdout).toMatch(/<- {2}250 /);
    const [file] = await waitForMail("carol@example.test", 1);
    expect(file!.content.toString()).toContain("Subject: sent with swaks");
    expect(file!.content.toString()).toContain("hello from swaks");
  });

  it("three local recipients and an alias fanning out to two make exactly five files", async () => {
    const before = await p.countAllMail();
    const raw = rawMessage("fan out");
    await transport().sendMail({
      envelope: {
        from: "someone@sender.test",
        to: ["dave@example.test", "erin@example.test", "alice@example.test", "crew@example.test"],
      },
      raw,
    });
    await waitFor(async () => (await p.countAllMail()) >= before + 5, { timeoutMs: 20_000 });
    await new Promise((r) => setTimeout(r, 1000)); // nothing more arrives
    expect(await p.countAllMail()).toBe(before + 5);
    for (const who of ["dave", "erin", "frank", "grace"]) {
      const files = await p.mailbox(`${who}@example.test`);
      expect(
        files.filter((f) => f.content.toString().includes("Subject: fan out")),
        who,
      ).toHaveLength(1);
    }
    const frank = (await p.mailbox("frank@example.test")).find((f) =>
      f.content.toString().includes("Subject: fan out"),
    )!;
    expect(headersOf(frank.content)[1]).toEqual({ name: "Delivered-To", value: "frank@example.test" });
  });
});

describe("inbound: refusals reach no Maildir", () => {
  async function smtp(commands: string[]): Promise<string[]> {
    const sock: Socket = connect(p.ports.mx, "127.0.0.1");
    const replies: string[] = [];
    let buf = "";
    const next = () =>
      new Promise<string>((resolve, reject) => {
        const check = () => {
          const m = /^(\d{3}) [^\r\n]*\r\n/m.exec(buf);
          if (m) {
            const end = buf.indexOf("\r\n", m.index) + 2;
            const all = buf.slice(0, end);
            buf = buf.slice(end);
            resolve(all.trim().split("\r\n").at(-1)!);
            return true;
          }
          return false;
        };
        if (check()) return;
        const onData = (d: Buffer) => {
          buf += d.toString();
          if (check()) sock.off("data", onData);
        };
        sock.on("data", onData);
        sock.once("error", reject);
        setTimeout(() => reject(new Error(`no reply; got ${JSON.stringify(buf)}`)), 10_000);
      });
    replies.push(await next());
    for (const c of commands) {
      sock.write(`${c}\r\n`);
      replies.push(await next());
    }
    sock.end("QUIT\r\n");
    return replies;
  }

  it("answers relay tricks, unknown users, malformed addresses, size and count limits with exact codes", async () => {
    const before = await p.countAllMail();
    const rcpt = async (address: string) =>
      (await smtp(["EHLO client.sender.test", "MAIL FROM:<someone@sender.test>", `RCPT TO:${address}`]))[3]!;
    const relay = /^550 5\.7\.1 /;
    expect(await rcpt("<user@other.test>")).toMatch(relay);
    expect(await rcpt("<user%other.test@example.test>")).toMatch(relay);
    expect(await rcpt('<"user@other.test"@example.test>')).toMatch(relay);
    expect(await rcpt("<@example.test:user@other.test>")).toMatch(relay);
    expect(await rcpt("<user@[127.0.0.1]>")).toMatch(relay);
    expect(await rcpt("<nobody@example.test>")).toMatch(/^550 5\.1\.1 /);
    expect(await rcpt("<not an address>")).toMatch(/^501 5\.1\.3 /);

    const many = ["EHLO client.sender.test", "MAIL FROM:<someone@sender.test>"];
    for (let i = 0; i < 101; i++) many.push(`RCPT TO:<alice+t${i}@example.test>`);
    const replies = await smtp(many);
    expect(replies.at(-1)).toMatch(/^452 4\.5\.3 /);

    const big = await transport()
      .sendMail({
        envelope: { from: "someone@sender.test", to: ["alice@example.test"] },
        raw: Buffer.concat([rawMessage("too big"), Buffer.alloc(26 * 1024 * 1024, "a")]),
      })
      .catch((e: { response?: string }) => e);
    expect((big as { response?: string }).response).toMatch(/^552 5\.3\.4 /);

    // a marker message after the refusals: once it is in, nothing else arrived
    await transport().sendMail({
      envelope: { from: "someone@sender.test", to: ["grace@example.test"] },
      raw: rawMessage("marker"),
    });
    await waitFor(async () => (await p.countAllMail()) === before + 1, { timeoutMs: 20_000 });
    await new Promise((r) => setTimeout(r, 1000));
    expect(await p.countAllMail()).toBe(before + 1);
  });

  it("refuses a DMARC p=reject failure with 550 5.7.1", async () => {
    const err = await transport({ localAddress: "127.0.0.5" })
      .sendMail({
        envelope: { from: "someone@strict.test", to: ["alice@example.test"] },
        raw: rawMessage("spoofed").toString().replace("sender.test>", "strict.test>"),
      })
      .catch((e: { response?: string }) => e);
    expect((err as { response?: string }).response).toMatch(/^550 5\.7\.1 /);
  });
});

describe("inbound: load and crashes", () => {
  it("500 messages over 20 connections make exactly 500 files per recipient, no duplicates", async () => {
    const t = transport({ pool: true, maxConnections: 20 });
    const ids = Array.from(
      { length: 500 },
      (_, i) => `<load-${i}-${randomBytes(4).toString("hex")}@sender.test>`,
    );
    await Promise.all(
      ids.map((id) =>
        t.sendMail({
          envelope: { from: "someone@sender.test", to: ["dave@example.test", "erin@example.test"] },
          raw: rawMessage("load")
            .toString()
            .replace(/Message-ID: <[^>]+>/, `Message-ID: ${id}`),
        }),
      ),
    );
    t.close();
    for (const who of ["dave@example.test", "erin@example.test"]) {
      await waitFor(
        async () => {
          const f = (await p.mailbox(who)).filter((x) => x.content.includes("Subject: load"));
          return f.length >= 500 ? f : false;
        },
        { timeoutMs: 60_000, message: `${who} did not get 500 messages` },
      );
      await new Promise((r) => setTimeout(r, 500));
      const all = (await p.mailbox(who)).filter((x) => x.content.includes("Subject: load"));
      expect(all).toHaveLength(500);
      const seen = new Set(all.map((f) => /Message-ID: (<[^>]+>)/i.exec(f.content.toString())![1]));
      expect(seen.size).toBe(500);
      expect([...seen].sort()).toEqual([...ids].sort());
    }
  }, 120_000);

  it("SIGKILL of mda while mail flows loses nothing and duplicates nothing", async () => {
    const t = transport({ pool: true, maxConnections: 10 });
    const ids = Array.from(
      { length: 300 },
      (_, i) => `<crash-${i}-${randomBytes(4).toString("hex")}@sender.test>`,
    );
    let sent = 0;
    const sending = Promise.all(
      ids.map((id) =>
        t
          .sendMail({
            envelope: { from: "someone@sender.test", to: ["frank@example.test"] },
            raw: rawMessage("crash")
              .toString()
              .replace(/Message-ID: <[^>]+>/, `Message-ID: ${id}`),
          })
          .then(() => sent++),
      ),
    );
    await waitFor(
      async () =>
        (await p.mailbox("frank@example.test")).filter((f) => f.content.includes("Subject: crash")).length >=
        30,
      {
        timeoutMs: 30_000,
      },
    );
    await p.services.get("mda")!.kill();
    await sending;
    t.close();
    expect(sent).toBe(300);
    await p.start("mda");
    const files = await waitFor(
      async () => {
        const f = (await p.mailbox("frank@example.test")).filter((x) => x.content.includes("Subject: crash"));
        return f.length >= 300 ? f : false;
      },
      { timeoutMs: 90_000, message: "not every accepted message reached the Maildir after the mda restart" },
    );
    await new Promise((r) => setTimeout(r, 1000));
    const all = (await p.mailbox("frank@example.test")).filter((x) => x.content.includes("Subject: crash"));
    expect(all).toHaveLength(300);
    const seen = new Set(all.map((f) => /Message-ID: (<[^>]+>)/i.exec(f.content.toString())![1]));
    expect([...seen].sort()).toEqual([...ids].sort());
    expect(files.length).toBe(300);
  }, 180_000);

  it("answers 451 4.3.0, not 250, when NATS goes away during DATA", async () => {
    const sock = connect(p.ports.mx, "127.0.0.1");
    let buf = "";
    sock.on("data", (d) => {
      buf += d.toString();
    });
    const waitReply = (re: RegExp) =>
      waitFor(() => re.test(buf), { timeoutMs: 20_000, message: `no ${re} in ${buf}` });
    await waitReply(/^220 /m);
    sock.write("EHLO client.sender.test\r\n");
    await waitReply(/^250 /m);
    sock.write("MAIL FROM:<someone@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n");
    await waitReply(/^354 /m);
    sock.write("Subject: bus down\r\n\r\nhello\r\n");
    await p.nats.kill();
    buf = "";
    sock.write(".\r\n");
    await waitReply(/^\d{3} /m);
    expect(buf).toMatch(/^451 4\.3\.0 /m);
    sock.destroy();
    await p.nats.restart();
    // mx is ready again once it reconnects, and accepts mail again
    await waitFor(async () => (await fetch(p.services.get("mx")!.url("/readyz"))).status === 200, {
      timeoutMs: 30_000,
    });
    const info = await transport().sendMail({
      envelope: { from: "someone@sender.test", to: ["alice@example.test"] },
      raw: rawMessage("after the outage"),
    });
    expect(info.response).toMatch(/^250 /);
    await waitFor(
      async () =>
        (await p.mailbox("alice@example.test")).some((f) => f.content.includes("Subject: after the outage")),
      { timeoutMs: 30_000 },
    );
  }, 90_000);
});
