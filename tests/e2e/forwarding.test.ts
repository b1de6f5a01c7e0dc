// Forwarding done right, end to end: an alias of example.test forwards to another domain; the copy
// leaves with the sender rewritten by SRS (so SPF passes at the destination) and an ARC set sealed
// with example.test's DKIM key (so the destination can trust our Authentication-Results); a bounce
// to the rewritten sender comes back through mx and goes to the original sender; forged and expired
// SRS addresses are refused at RCPT with 550 5.1.1.

import { dkimDnsRecord, generateDkimKey, Srs } from "@mailpipe/directory";
import { createResolver, mailauthResolver } from "@mailpipe/dns";
import { type SmtpPeer, startSmtpPeer } from "@mailpipe/testing";
import { authenticate, spf } from "mailauth";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Pipeline, startPipeline } from "./harness.ts";

const SECRET = "e2e-forwarding-srs-secret-0123";
/** the original sender's client: a host sender.test's SPF allows, and that is not us */
const CLIENT_IP = "127.0.0.7";

let p: Pipeline;
let remote: SmtpPeer; // mx.remote.test: where the alias forwards to
let senderMx: SmtpPeer; // mx.sender.test: where bounces to the original sender go

function indent(text: string, by: string): string {
  return text
    .trim()
    .split("\n")
    .map((l) => by + l)
    .join("\n");
}

beforeAll(async () => {
  const pem = await generateDkimKey("rsa-sha256");
  const directory = `domains:
  example.test:
    dkim:
      selector: mail
      privateKey: |
${indent(pem, "        ")}
users:
  alice@example.test: {}
aliases:
  fwd@example.test: [friend@remote.test]
srs:
  secrets: [${SECRET}]
`;
  p = await startPipeline({
    services: ["router", "delivery", "mx"],
    directory,
    dns: {
      "sender.test": {
        TXT: [`v=spf1 ip4:${CLIENT_IP} -all`],
        MX: [{ exchange: "mx.sender.test", priority: 10 }],
      },
      "mx.sender.test": { A: ["127.0.0.3"] },
      // we send from 127.0.0.1: example.test's SPF says so
      "example.test": { TXT: ["v=spf1 ip4:127.0.0.1 -all"] },
      "mail._domainkey.example.test": { TXT: [dkimDnsRecord(pem)] },
      "remote.test": { MX: [{ exchange: "mx.remote.test", priority: 10 }] },
      "mx.remote.test": { A: ["127.0.0.2"] },
    },
  });
  remote = await startSmtpPeer({ host: "127.0.0.2", port: p.ports.remoteSmtp, name: "mx.remote.test" });
  senderMx = await startSmtpPeer({ host: "127.0.0.3", port: p.ports.remoteSmtp, name: "mx.sender.test" });
}, 120_000);

afterAll(async () => {
  await Promise.all([remote?.stop(), senderMx?.stop()]);
  await p?.stop();
});

function client() {
  return nodemailer.createTransport({
    host: "127.0.0.1",
    port: p.ports.mx,
    secure: false,
    ignoreTLS: true,
    localAddress: CLIENT_IP,
  } as TransportOptions);
}

const message = (subject: string) =>
  [
    "From: Alice <alice@sender.test>",
    "To: fwd@example.test",
    `Subject: ${subject}`,
    `Message-ID: <${subject.replace(/\W+/g, "-")}@sender.test>`,
    "",
    `Body of ${subject}.`,
    "",
  ].join("\r\n");

describe("forwarding to another domain", () => {
  let rewritten = "";

  it("rewrites the sender with SRS so that SPF passes at the destination, and seals an ARC set", async () => {
    const info = await client().sendMail({
      envelope: { from: "alice@sender.test", to: ["fwd@example.test"] },
      raw: message("forwarded once"),
    });
    expect(info.response).toMatch(/^250 /);
    const [got] = await remote.waitForMessages(1, 30_000);
    expect(got!.rcptTo).toEqual(["friend@remote.test"]);
    rewritten = got!.mailFrom;
    expect(rewritten).toMatch(/^SRS0=[^=]{4}=[A-Z2-7]{2}=sender\.test=alice@example\.test$/);

    // what the destination checks, with the same DNS: SPF of the envelope sender from our address
    // mailauth's resolver type lists only TXT/A answers; the adapter also answers MX, as node's does
    const resolver = mailauthResolver(createResolver({ servers: [p.dns.address] })) as never;
    const checked = await spf({
      sender: rewritten,
      ip: got!.remoteAddress.replace(/^::ffff:/, ""),
      helo: got!.helo ?? "",
      mta: "mx.remote.test",
      resolver,
    });
    expect(checked.status.result).toBe("pass");
    // without the rewrite, the original sender's SPF fails from our address
    const unrewritten = await spf({
      sender: "alice@sender.test",
      ip: got!.remoteAddress.replace(/^::ffff:/, ""),
      helo: got!.helo ?? "",
      mta: "mx.remote.test",
      resolver,
    });
    expect(unrewritten.status.result).toBe("fail");

    // the ARC set verifies, and carries our results for the first hop
    const auth = await authenticate(got!.raw, {
      ip: got!.remoteAddress.replace(/^::ffff:/, ""),
      helo: got!.helo ?? "",
      sender: rewritten,
      mta: "mx.remote.test",
      resolver,
    });
    expect(auth.arc && auth.arc.status.result).toBe("pass");
    const text = got!.raw.toString();
    expect(text).toMatch(/^ARC-Seal: i=1; a=rsa-sha256; t=\d+; cv=none; d=example\.test; s=mail;/m);
    expect(text).toMatch(/^ARC-Authentication-Results: i=1; mail\.example\.test;[\s\S]*?spf=pass/m);
    expect(text).toContain("Subject: forwarded once");
  });

  it("routes a bounce to the rewritten sender back to the original sender", async () => {
    expect(rewritten).not.toBe("");
    const dsn = [
      "From: MAILER-DAEMON@mx.remote.test",
      "To: " + rewritten,
      "Subject: Undelivered Mail Returned to Sender",
      "",
      "friend@remote.test: mailbox full",
      "",
    ].join("\r\n");
    const info = await nodemailer
      .createTransport({
        host: "127.0.0.1",
        port: p.ports.mx,
        secure: false,
        ignoreTLS: true,
      } as TransportOptions)
      .sendMail({ envelope: { from: "", to: [rewritten] }, raw: dsn });
    expect(info.response).toMatch(/^250 /);
    const [bounce] = await senderMx.waitForMessages(1, 30_000);
    expect(bounce!.rcptTo).toEqual(["alice@sender.test"]);
    expect(bounce!.mailFrom).toBe("");
    expect(bounce!.raw.toString()).toContain("friend@remote.test: mailbox full");
  });

  it("refuses forged and expired SRS addresses at RCPT with 550 5.1.1", async () => {
    const send = (to: string) =>
      nodemailer
        .createTransport({
          host: "127.0.0.1",
          port: p.ports.mx,
          secure: false,
          ignoreTLS: true,
        } as TransportOptions)
        .sendMail({ envelope: { from: "", to: [to] }, raw: "Subject: spam\r\n\r\nbackscatter\r\n" });
    const forged = new Srs({ secrets: ["somebody-elses-secret-000"] }).forward(
      "victim@sender.test",
      "example.test",
    );
    await expect(send(forged)).rejects.toMatchObject({
      responseCode: 550,
      response: expect.stringMatching(/5\.1\.1/),
    });
    const old = new Srs({ secrets: [SECRET] }).forward(
      "alice@sender.test",
      "example.test",
      Date.now() - 30 * 86_400_000,
    );
    await expect(send(old)).rejects.toMatchObject({
      responseCode: 550,
      response: expect.stringMatching(/5\.1\.1 .*expired/),
    });
    // nothing reached the original sender's MX for either
    await new Promise((r) => setTimeout(r, 1000));
    expect(senderMx.messages.filter((m) => m.raw.toString().includes("backscatter"))).toHaveLength(0);
  });
});
