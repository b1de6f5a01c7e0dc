// Local delivery through Dovecot end to end: msa → router → mda (MDA_BACKEND=lmtp) → Dovecot, with
// real processes and a real Dovecot; what arrives is read back over IMAP.
import { hashPassword } from "@mailpipe/directory";
import { type DovecotHandle, imapFetchAll, startDovecot, waitFor } from "@mailpipe/testing";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Pipeline, startPipeline } from "./harness.ts";

let p: Pipeline;
let dovecot: DovecotHandle;

beforeAll(async () => {
  dovecot = await startDovecot({
    users: [
      { address: "alice@example.test" },
      { address: "full@example.test", quota: "1K" },
      {
        address: "bob@example.test",
        sieve: `require ["fileinto"];\nif header :contains "Subject" "[lists]" { fileinto "Lists"; }\n`,
      },
    ],
  });
  const pw = await hashPassword("alice-dev-password");
  p = await startPipeline({
    services: ["mda", "router", "msa"],
    directory: `domains:
  example.test: {}
users:
  alice@example.test:
    password: "${pw}"
  bob@example.test: {}
  full@example.test: {}
`,
    serviceEnv: {
      mda: { MDA_BACKEND: "lmtp", LMTP_URL: dovecot.lmtpSocketUrl },
      router: { DSN_BATCH_DELAY: "200ms" },
    },
  });
}, 120_000);

afterAll(async () => {
  await p?.stop();
  await dovecot?.stop();
});

function submit() {
  return nodemailer.createTransport({
    host: "127.0.0.1",
    port: p.ports.submission,
    secure: false,
    requireTLS: true,
    tls: { rejectUnauthorized: false },
    auth: { user: "alice@example.test", pass: "alice-dev-password" },
  } as TransportOptions);
}

const imap = (user: string, mailbox = "INBOX") =>
  imapFetchAll({ port: dovecot.imapPort, user, password: "secret", mailbox });

describe("local delivery over LMTP: msa → router → mda → Dovecot", () => {
  it("files by the user's Sieve script, and an over-quota mailbox bounces to the sender with 5.2.2", async () => {
    const t = submit();
    await t.sendMail({
      envelope: { from: "alice@example.test", to: ["bob@example.test"] },
      raw: "From: alice@example.test\r\nTo: bob@example.test\r\nSubject: [lists] weekly\r\n\r\nnews\r\n",
    });
    await t.sendMail({
      envelope: { from: "alice@example.test", to: ["full@example.test"] },
      raw: `From: alice@example.test\r\nTo: full@example.test\r\nSubject: too big\r\n\r\n${"x".repeat(4000)}\r\n`,
    });
    t.close();

    const lists = await waitFor(
      async () => {
        const m = await imap("bob@example.test", "Lists").catch(() => []);
        return m.length ? m : false;
      },
      { timeoutMs: 30_000, message: "bob's Lists folder" },
    );
    expect(lists).toHaveLength(1);
    expect(lists[0]!.raw).toContain("Subject: [lists] weekly");
    expect(lists[0]!.raw).toMatch(/^Return-Path: <alice@example\.test>\r\n/);
    expect(lists[0]!.raw).toContain("\r\nDelivered-To: bob@example.test\r\n");
    expect(await imap("bob@example.test")).toEqual([]);

    // the failure DSN comes back to alice, through Dovecot too, with Dovecot's reply in it
    const dsn = await waitFor(
      async () => {
        const m = (await imap("alice@example.test")).filter((x) =>
          /Content-Type: multipart\/report/i.test(x.raw),
        );
        return m.length ? m : false;
      },
      { timeoutMs: 40_000, message: "a failure DSN in alice's INBOX" },
    );
    expect(dsn).toHaveLength(1);
    // unfolded: the report's fields may be folded
    const text = dsn[0]!.raw.replace(/\r\n[ \t]+/g, " ");
    expect(text).toMatch(/^Return-Path: <>\r\n/);
    expect(text).toMatch(/Final-Recipient: rfc822; ?full@example\.test/i);
    expect(text).toMatch(/Action: failed/);
    expect(text).toMatch(/Status: 5\.2\.2/);
    expect(text).toMatch(
      /Diagnostic-Code: smtp; ?552 5\.2\.2 <full@example\.test> Quota exceeded \(mailbox for user is full\)/,
    );
    expect(await imap("full@example.test")).toEqual([]);
  }, 90_000);
});
