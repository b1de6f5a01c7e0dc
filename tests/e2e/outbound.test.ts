// Submission and outbound mail end to end: msa → router → delivery → remote MX (SMTP peers on
// 127.0.0.x), retries in Redis, bounces back into the sender's Maildir, and mailctl's queue view.
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { createResolver, mailauthResolver } from "@mailpipe/dns";
import { repoRoot, type SmtpPeer, sequence, startSmtpPeer, waitFor } from "@mailpipe/testing";
import { authenticate } from "mailauth";
import { simpleParser } from "mailparser";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { headersOf, type Pipeline, startPipeline } from "./harness.ts";

const exec = promisify(execFile);

const remoteDns = {
  "remote.test": {
    MX: [
      { exchange: "mx1.remote.test", priority: 10 },
      { exchange: "mx2.remote.test", priority: 20 },
    ],
  },
  "mx1.remote.test": { A: ["127.0.0.2"] },
  "mx2.remote.test": { A: ["127.0.0.3"] },
  "fallback.test": {
    MX: [
      { exchange: "dead.fallback.test", priority: 10 },
      { exchange: "mx2.remote.test", priority: 20 },
    ],
  },
  "dead.fallback.test": { A: ["127.0.0.4"] },
  "slow.test": { MX: [{ exchange: "mx.slow.test", priority: 10 }] },
  "mx.slow.test": { A: ["127.0.0.5"] },
  "nullmx.test": { MX: [{ exchange: ".", priority: 0 }] },
};

async function dkimRecord(p: Pipeline): Promise<string> {
  const txt = await readFile(join(p.dir.path, "dkim", "example.test.mail.dns.txt"), "utf8");
  return /"(.*)"/.exec(txt)![1]!;
}

function submit(p: Pipeline, user = "alice", implicitTls = false) {
  return nodemailer.createTransport({
    host: "127.0.0.1",
    port: implicitTls ? p.ports.submissions : p.ports.submission,
    secure: implicitTls,
    requireTLS: !implicitTls,
    tls: { rejectUnauthorized: false },
    auth: { user: `${user}@example.test`, pass: `${user}-dev-password` },
  } as TransportOptions);
}

function message(subject: string, to: string): string {
  return [
    "From: Alice <alice@example.test>",
    `To: ${to}`,
    `Subject: ${subject}`,
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=utf-8",
    "",
    `Body of ${subject}.`,
    "",
  ].join("\r\n");
}

async function dsnFor(
  p: Pipeline,
  subjectOfOriginal: string,
  action: "failed" | "delayed",
  timeoutMs = 30_000,
) {
  return waitFor(
    async () => {
      for (const f of await p.mailbox("alice@example.test")) {
        const parsed = await simpleParser(f.content, { keepDeliveryStatus: true } as never);
        const text = f.content.toString();
        if (!/report-type=delivery-status/i.test(text)) continue;
        if (!text.includes(`Subject: ${subjectOfOriginal}`)) continue;
        if (!new RegExp(`Action: ${action}`, "i").test(text)) continue;
        return { parsed, text };
      }
      return false;
    },
    { timeoutMs, message: `no ${action} DSN for "${subjectOfOriginal}" in alice's Maildir` },
  );
}

describe("submission and outbound", () => {
  let p: Pipeline;
  let mx1: SmtpPeer;
  let mx2: SmtpPeer;
  let slow: SmtpPeer;

  beforeAll(async () => {
    p = await startPipeline({
      services: ["mda", "router", "delivery", "msa"],
      dns: remoteDns,
      env: { RETRY_SCHEDULE: "2s,2s,2s", DSN_BATCH_DELAY: "500ms" },
    });
    p.dns.set("mail._domainkey.example.test", { TXT: [await dkimRecord(p)] });
    const port = p.ports.remoteSmtp;
    mx1 = await startSmtpPeer({ host: "127.0.0.2", port, name: "mx1.remote.test", starttls: true });
    mx2 = await startSmtpPeer({ host: "127.0.0.3", port, name: "mx2.remote.test" });
    slow = await startSmtpPeer({
      host: "127.0.0.5",
      port,
      name: "mx.slow.test",
      script: {
        data: sequence(
          { reply: 451, text: "4.7.1 greylisted, try again" },
          { reply: 451, text: "4.7.1 greylisted, try again" },
          "accept",
        ),
      },
    });
  }, 120_000);

  afterAll(async () => {
    await Promise.all([mx1?.stop(), mx2?.stop(), slow?.stop()]);
    await p?.stop();
  });

  it("submits over 587 and 465; the local copy's DKIM signature verifies", async () => {
    await submit(p).sendMail({
      envelope: { from: "alice@example.test", to: ["bob@example.test"] },
      raw: message("over 587", "bob@example.test"),
    });
    await submit(p, "alice", true).sendMail({
      envelope: { from: "alice@example.test", to: ["bob@example.test"] },
      raw: message("over 465", "bob@example.test"),
    });
    const files = await waitFor(
      async () => {
        const f = await p.mailbox("bob@example.test");
        return f.length >= 2 ? f : false;
      },
      { timeoutMs: 20_000 },
    );
    const resolver = mailauthResolver(createResolver({ servers: [p.dns.address] }));
    for (const f of files) {
      const headers = headersOf(f.content);
      expect(headers.some((h) => h.name === "DKIM-Signature" && /d=example\.test/.test(h.value))).toBe(true);
      expect(headers.some((h) => h.name === "Message-ID")).toBe(true);
      expect(headers.some((h) => h.name === "Date")).toBe(true);
      const result = await authenticate(f.content, {
        ip: "127.0.0.1",
        helo: "client",
        sender: "alice@example.test",
        mta: "test",
        resolver: resolver as never,
      } as never);
      expect(
        (result as { dkim: { results: { status: { result: string } }[] } }).dkim.results[0]!.status.result,
      ).toBe("pass");
    }
  });

  it("submits with swaks (STARTTLS + AUTH)", async () => {
    const { stdout } = await exec("swaks", [
      "--server",
      `127.0.0.1:${p.ports.submission}`,
      "--tls",
      "--auth-user",
      "bob@example.test",
      "--auth-password",
      "bob-dev-password",
      "--from",
      "bob@example.test",
      "--to",
      "alice@example.test",
      "--header",
      "Subject: swaks submission",
      "--body",
      "from swaks",
    ]);
    expect(stdout).toMatch(/<- {2}250 /);
    await waitFor(
      async () =>
        (await p.mailbox("alice@example.test")).some((f) => f.content.includes("Subject: swaks submission")),
      { timeoutMs: 20_000 },
    );
  });

  it("delivers to the first MX with every envelope recipient, the message byte-exact after our headers", async () => {
    const raw = message("to remote", "bob@remote.test");
    await submit(p).sendMail({
      envelope: { from: "alice@example.test", to: ["bob@remote.test", "carol@remote.test"] },
      raw,
    });
    await mx1.waitForMessages(1, 30_000);
    const m = mx1.messages.find((x) => x.raw.includes("Subject: to remote"))!;
    expect(m.mailFrom).toBe("alice@example.test");
    expect([...m.rcptTo].sort()).toEqual(["bob@remote.test", "carol@remote.test"]);
    expect(m.raw.subarray(m.raw.length - Buffer.byteLength(raw)).toString()).toBe(raw);
    expect(m.tls).toBe(true);
    expect(mx2.messages.some((x) => x.raw.includes("Subject: to remote"))).toBe(false);
  });

  it("falls back to the second MX when the first refuses connections", async () => {
    await submit(p).sendMail({
      envelope: { from: "alice@example.test", to: ["dan@fallback.test"] },
      raw: message("fallback", "dan@fallback.test"),
    });
    await waitFor(() => mx2.messages.some((x) => x.raw.includes("Subject: fallback")), { timeoutMs: 30_000 });
    expect(mx2.messages.find((x) => x.raw.includes("Subject: fallback"))!.rcptTo).toEqual([
      "dan@fallback.test",
    ]);
  });

  it("retries a 451 on the schedule held in Redis and delivers on the third attempt", async () => {
    await submit(p).sendMail({
      envelope: { from: "alice@example.test", to: ["eve@slow.test"] },
      raw: message("greylisted", "eve@slow.test"),
    });
    // between attempts the retry is visible in Redis, through the operator's own view
    const entry = await waitFor(
      async () => {
        const { stdout } = await exec(
          "node",
          [join(repoRoot, "packages/mailctl/src/main.ts"), "queue", "--json"],
          {
            env: { ...process.env, REDIS_URL: p.redis.url },
          },
        );
        const list = JSON.parse(stdout).scheduled as {
          recipient: string;
          attempts: number;
          nextAttemptAt: string;
          lastReply?: { code: number; enhanced: string };
        }[];
        return list.find((e) => e.recipient === "eve@slow.test") ?? false;
      },
      { timeoutMs: 20_000, message: "the retry never showed in mailctl queue" },
    );
    expect(entry.attempts).toBeGreaterThanOrEqual(1);
    expect(entry.lastReply).toMatchObject({ code: 451, enhanced: "4.7.1" });
    expect(Number.isNaN(Date.parse(entry.nextAttemptAt))).toBe(false);

    await slow.waitForMessages(1, 60_000);
    expect(slow.transactions).toBeGreaterThanOrEqual(3);
    expect(slow.messages.filter((x) => x.raw.includes("Subject: greylisted"))).toHaveLength(1);
  });

  it("bounces a 550 5.1.1 with an RFC 3464 report in the sender's Maildir", async () => {
    mx1.setScript({
      rcpt: (ctx) =>
        ctx.recipient?.startsWith("gone@")
          ? { reply: 550, text: "5.1.1 <gone@remote.test>: no such user" }
          : "accept",
    });
    await submit(p).sendMail({
      envelope: { from: "alice@example.test", to: ["gone@remote.test"] },
      raw: message("to a gone user", "gone@remote.test"),
    });
    const { text } = await dsnFor(p, "to a gone user", "failed");
    expect(text).toMatch(/^From: .*MAILER-DAEMON@mail\.example\.test/m);
    expect(text).toMatch(/Final-Recipient: rfc822; ?gone@remote\.test/i);
    expect(text).toMatch(/Status: 5\.1\.1/);
    expect(text).toMatch(/Diagnostic-Code: smtp; ?550 5\.1\.1 <gone@remote\.test>: no such user/);
    expect(text).toMatch(/Remote-MTA: dns; ?mx1\.remote\.test/i);
    const copy = (await p.mailbox("alice@example.test")).find(
      (f) => f.content.includes("to a gone user") && f.content.includes("delivery-status"),
    )!;
    expect(headersOf(copy.content)[0]).toEqual({ name: "Return-Path", value: "<>" });
    mx1.setScript({});
  });

  it("bounces a null MX and a domain that does not exist at once", async () => {
    await submit(p).sendMail({
      envelope: { from: "alice@example.test", to: ["x@nullmx.test"] },
      raw: message("to null mx", "x@nullmx.test"),
    });
    await submit(p).sendMail({
      envelope: { from: "alice@example.test", to: ["y@nowhere.test"] },
      raw: message("to nowhere", "y@nowhere.test"),
    });
    const nullmx = await dsnFor(p, "to null mx", "failed", 15_000);
    expect(nullmx.text).toMatch(/Status: 5\.1\.10/);
    const nx = await dsnFor(p, "to nowhere", "failed", 15_000);
    expect(nx.text).toMatch(/Status: 5\.1\.2/);
  });
});

describe("expiry", () => {
  let p: Pipeline;
  let peer: SmtpPeer;
  beforeAll(async () => {
    p = await startPipeline({
      services: ["mda", "router", "delivery", "msa"],
      dns: remoteDns,
      env: { RETRY_SCHEDULE: "1s", QUEUE_LIFETIME: "8s", DELAY_WARNING: "2s", DSN_BATCH_DELAY: "200ms" },
    });
    peer = await startSmtpPeer({
      host: "127.0.0.5",
      port: p.ports.remoteSmtp,
      script: { data: { reply: 451, text: "4.3.2 always later" } },
    });
  }, 120_000);
  afterAll(async () => {
    await peer?.stop();
    await p?.stop();
  });

  it("sends one delay notice, then bounces when the queue lifetime ends", async () => {
    await submit(p).sendMail({
      envelope: { from: "alice@example.test", to: ["eve@slow.test"] },
      raw: message("never accepted", "eve@slow.test"),
    });
    const delayed = await dsnFor(p, "never accepted", "delayed", 20_000);
    expect(delayed.text).toMatch(/Status: 4\.3\.2/);
    expect(delayed.text).toMatch(/Will-Retry-Until:/i);
    const failed = await dsnFor(p, "never accepted", "failed", 30_000);
    expect(failed.text).toMatch(/Diagnostic-Code: smtp; ?451 4\.3\.2 always later/);
    const box = await p.mailbox("alice@example.test");
    const notices = box.filter(
      (f) => f.content.includes("never accepted") && f.content.includes("delivery-status"),
    );
    expect(notices).toHaveLength(2); // one delay notice, one bounce
    const order = notices.map((f) => (/Action: (\w+)/i.exec(f.content.toString())?.[1] ?? "").toLowerCase());
    expect(order).toEqual(["delayed", "failed"]);
    expect(peer.transactions).toBeGreaterThanOrEqual(2);
  }, 60_000);
});

describe("mailctl queue", () => {
  let p: Pipeline;
  let peer: SmtpPeer;
  const mailctl = (...args: string[]) =>
    exec("node", [join(repoRoot, "packages/mailctl/src/main.ts"), ...args], {
      env: { ...process.env, REDIS_URL: p.redis.url },
    });

  beforeAll(async () => {
    p = await startPipeline({
      services: ["mda", "router", "delivery", "msa"],
      dns: remoteDns,
      env: { RETRY_SCHEDULE: "1h", DSN_BATCH_DELAY: "200ms" },
    });
    peer = await startSmtpPeer({
      host: "127.0.0.5",
      port: p.ports.remoteSmtp,
      script: { data: { reply: 451, text: "4.4.5 system busy" } },
    });
  }, 120_000);
  afterAll(async () => {
    await peer?.stop();
    await p?.stop();
  });

  it("lists scheduled retries, flushes them, and deletes one with a bounce and one without", async () => {
    await submit(p).sendMail({
      envelope: { from: "alice@example.test", to: ["one@slow.test", "two@slow.test"] },
      raw: message("held", "one@slow.test"),
    });
    const listed = await waitFor(
      async () => {
        const { stdout } = await mailctl("queue");
        return stdout.includes("one@slow.test") && stdout.includes("two@slow.test") ? stdout : false;
      },
      { timeoutMs: 20_000 },
    );
    expect(listed).toMatch(/one@slow\.test → slow\.test {2}attempts 1 {2}next \S+ \(in (5[4-9]|6[0-6])m\)/);
    expect(listed).toMatch(/last reply: 451 4\.4\.5 system busy/);

    const tx = peer.transactions;
    const { stdout: flushed } = await mailctl("queue", "flush");
    expect(flushed).toMatch(/^2 scheduled retries are due now/);
    await waitFor(() => peer.transactions > tx, {
      timeoutMs: 15_000,
      message: "flush did not cause a new attempt",
    });
    const list = await waitFor(
      async () => {
        const { stdout } = await mailctl("queue", "--json");
        const s = JSON.parse(stdout).scheduled as { id: string; recipient: string; attempts: number }[];
        return s.length === 2 && s.every((e) => e.attempts === 2) ? s : false;
      },
      { timeoutMs: 15_000 },
    );

    const one = list.find((e) => e.recipient === "one@slow.test")!;
    const two = list.find((e) => e.recipient === "two@slow.test")!;
    expect((await mailctl("queue", "delete", one.id, "--bounce")).stdout).toMatch(/will be bounced/);
    expect((await mailctl("queue", "delete", two.id, "--drop")).stdout).toMatch(/dropped/);
    const { text } = await dsnFor(p, "held", "failed", 20_000);
    expect(text).toMatch(/Final-Recipient: rfc822; ?one@slow\.test/i);
    expect(text).not.toMatch(/two@slow\.test/);
    await waitFor(async () => !(await mailctl("queue")).stdout.includes("slow.test"), { timeoutMs: 15_000 });
    const missing = await mailctl("queue", "delete", "no-such-id").catch(
      (e: { stderr: string; code: number }) => e,
    );
    expect((missing as { code: number }).code).toBe(1);
    expect((missing as { stderr: string }).stderr).toMatch(/no scheduled retry no-such-id/);
  }, 90_000);
});
