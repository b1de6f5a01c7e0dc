// RFC 3461 RET end to end: submitted over msa with RET=FULL or RET=HDRS (and ENVID, ORCPT), the
// message fails at the next hop, and the report in the sender's Maildir returns what was asked.
import { type SmtpPeer, startSmtpPeer, waitFor } from "@mailpipe/testing";
import { type SimpleParserOptions, simpleParser } from "mailparser";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Pipeline, startPipeline } from "./harness.ts";

let p: Pipeline;
let mx: SmtpPeer;

function submit() {
  return nodemailer.createTransport({
    host: "127.0.0.1",
    port: p.ports.submission,
    requireTLS: true,
    tls: { rejectUnauthorized: false },
    auth: { user: "alice@example.test", pass: "alice-dev-password" },
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
    `The body of ${subject}.`,
    "",
  ].join("\r\n");
}

/** The message/delivery-status part as field maps: the per-message block, then one per recipient. */
function parseDeliveryStatus(text: string) {
  const blocks = text
    .replace(/\r\n[ \t]+/g, " ")
    .split(/\r?\n\r?\n/)
    .filter((b) => b.trim() !== "")
    .map((b) => {
      const fields: Record<string, string> = {};
      for (const line of b.split(/\r?\n/)) {
        const colon = line.indexOf(":");
        if (colon > 0) fields[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
      }
      return fields;
    });
  return { perMessage: blocks[0] ?? {}, recipients: blocks.slice(1) };
}

/** The failure report for the message with this subject, parsed. */
async function reportFor(subject: string) {
  const raw = await waitFor(
    async () => {
      for (const f of await p.mailbox("alice@example.test")) {
        const text = f.content.toString("latin1");
        if (/report-type=delivery-status/i.test(text) && text.includes(`Subject: ${subject}`))
          return f.content;
      }
      return false;
    },
    { timeoutMs: 60_000, message: `no DSN for "${subject}" in alice's Maildir` },
  );
  const mail = await simpleParser(raw, { keepDeliveryStatus: true } as SimpleParserOptions);
  const status = mail.attachments.find((a) => a.contentType === "message/delivery-status");
  return { mail, report: parseDeliveryStatus(status?.content.toString("utf8") ?? "") };
}

beforeAll(async () => {
  p = await startPipeline({
    services: ["mda", "router", "delivery", "msa"],
    dns: {
      "remote.test": { MX: [{ exchange: "mx.remote.test", priority: 10 }] },
      "mx.remote.test": { A: ["127.0.0.2"] },
    },
    env: { DSN_BATCH_DELAY: "200ms" },
  });
  mx = await startSmtpPeer({
    host: "127.0.0.2",
    port: p.ports.remoteSmtp,
    name: "mx.remote.test",
    script: { rcpt: () => ({ reply: 550, text: "5.1.1 no such user here" }) },
  });
}, 120_000);

afterAll(async () => {
  await mx?.stop();
  await p?.stop();
});

describe("DSN RET", () => {
  it("RET=FULL returns the whole message; ENVID and ORCPT are in the report", async () => {
    await submit().sendMail({
      envelope: { from: "alice@example.test", to: ["gone@remote.test"] },
      raw: message("returned in full", "gone@remote.test"),
      dsn: { id: "envelope-17", return: "full", notify: ["FAILURE"], recipient: "first@example.org" },
    } as never);
    const { mail, report } = await reportFor("returned in full");
    expect(report.perMessage["original-envelope-id"]).toBe("envelope-17");
    expect(report.perMessage["reporting-mta"]).toBe("dns; mail.example.test");
    expect(report.recipients).toHaveLength(1);
    expect(report.recipients[0]).toMatchObject({
      "original-recipient": "rfc822; first@example.org",
      "final-recipient": "rfc822; gone@remote.test",
      action: "failed",
      status: "5.1.1",
    });
    const returned = mail.attachments.find((a) => a.contentType === "message/rfc822");
    expect(returned).toBeDefined();
    const inner = await simpleParser(returned!.content);
    expect(inner.subject).toBe("returned in full");
    expect(inner.text).toContain("The body of returned in full.");
    expect(mail.attachments.some((a) => a.contentType === "text/rfc822-headers")).toBe(false);
  }, 90_000);

  it("RET=HDRS returns the headers only", async () => {
    await submit().sendMail({
      envelope: { from: "alice@example.test", to: ["gone@remote.test"] },
      raw: message("headers only", "gone@remote.test"),
      dsn: { id: "envelope-18", return: "headers", notify: ["FAILURE", "DELAY"] },
    } as never);
    const { mail, report } = await reportFor("headers only");
    expect(report.perMessage["original-envelope-id"]).toBe("envelope-18");
    expect(report.recipients[0]).toMatchObject({ action: "failed", status: "5.1.1" });
    expect(report.recipients[0]!["original-recipient"]).toBeUndefined();
    const headers = mail.attachments.find((a) => a.contentType === "text/rfc822-headers");
    expect(headers?.content.toString("latin1")).toContain("Subject: headers only");
    expect(headers?.content.toString("latin1")).not.toContain("The body of");
    expect(mail.attachments.some((a) => a.contentType === "message/rfc822")).toBe(false);
  }, 90_000);
});
