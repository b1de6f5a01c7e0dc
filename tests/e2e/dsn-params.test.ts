// RFC 3461 DSN parameters end to end: mx and msa advertise DSN and check NOTIFY, RET, ENVID and
// ORCPT (501 5.5.4 for bad values); a submitted message's ENVID and ORCPT come back in the failure
// report (read with mailparser), and NOTIFY=NEVER suppresses the bounce.
import { execFile } from "node:child_process";
import { connect } from "node:net";
import { promisify } from "node:util";
import { type SmtpPeer, startSmtpPeer, waitFor } from "@mailpipe/testing";
import { type SimpleParserOptions, simpleParser } from "mailparser";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Pipeline, startPipeline } from "./harness.ts";

const exec = promisify(execFile);

const dns = {
  "remote.test": { MX: [{ exchange: "mx1.remote.test", priority: 10 }] },
  "mx1.remote.test": { A: ["127.0.0.2"] },
};

let p: Pipeline;
let mx1: SmtpPeer;

beforeAll(async () => {
  p = await startPipeline({
    services: ["mda", "router", "delivery", "msa", "mx"],
    dns,
    env: { RETRY_SCHEDULE: "1h", DSN_BATCH_DELAY: "200ms" },
  });
  mx1 = await startSmtpPeer({
    host: "127.0.0.2",
    port: p.ports.remoteSmtp,
    name: "mx1.remote.test",
    script: { rcpt: { reply: 550, text: "5.1.1 no such user" } },
  });
}, 120_000);

afterAll(async () => {
  await mx1?.stop();
  await p?.stop();
});

/** One SMTP dialog on a socket: the last line of each reply. */
async function dialog(port: number, commands: string[]): Promise<string[]> {
  const sock = connect(port, "127.0.0.1");
  const out: string[] = [];
  let buf = "";
  const next = () =>
    new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no reply; got ${JSON.stringify(buf)}`)), 15_000);
      const check = () => {
        const m = /^(\d{3}) [^\r\n]*\r\n/m.exec(buf);
        if (!m) return false;
        const end = buf.indexOf("\r\n", m.index) + 2;
        const all = buf.slice(0, end);
        buf = buf.slice(end);
        clearTimeout(timer);
        resolve(all);
        return true;
      };
      if (check()) return;
      const onData = (d: Buffer) => {
        buf += d.toString();
        if (check()) sock.off("data", onData);
      };
      sock.on("data", onData);
      sock.once("error", reject);
    });
  out.push(await next());
  for (const c of commands) {
    sock.write(`${c}\r\n`);
    out.push(await next());
  }
  sock.end("QUIT\r\n");
  return out;
}

function submit() {
  return nodemailer.createTransport({
    host: "127.0.0.1",
    port: p.ports.submission,
    requireTLS: true,
    tls: { rejectUnauthorized: false },
    auth: { user: "alice@example.test", pass: "alice-dev-password" },
  } as TransportOptions);
}

function message(subject: string): string {
  return [
    "From: alice@example.test",
    "To: gone@remote.test",
    `Subject: ${subject}`,
    "",
    `Body of ${subject}.`,
    "",
  ].join("\r\n");
}

function queueIdOf(response: string): string {
  const id = /queued as (\S+)/.exec(response)?.[1];
  if (!id) throw new Error(`no queue id in ${response}`);
  return id;
}

describe("DSN parameters at the edge", () => {
  it("mx advertises DSN and refuses bad NOTIFY, RET, ENVID and ORCPT with 501 5.5.4", async () => {
    const mail = "MAIL FROM:<someone@sender.test>";
    const ehlo = await dialog(p.ports.mx, ["EHLO client.sender.test"]);
    expect(ehlo[1]).toMatch(/^250[- ]DSN\r?$/m);

    const rcpt = async (params: string) =>
      (await dialog(p.ports.mx, ["EHLO c.test", mail, `RCPT TO:<alice@example.test> ${params}`]))[3]!;
    expect(await rcpt("NOTIFY=SOMETIMES")).toMatch(/^501 5\.5\.4 /);
    expect(await rcpt("NOTIFY=NEVER,FAILURE")).toMatch(/^501 5\.5\.4 /);
    expect(await rcpt("ORCPT=no-semicolon")).toMatch(/^501 5\.5\.4 /);
    expect(await rcpt("NOTIFY=FAILURE NOTIFY=DELAY")).toMatch(/^501 5\.5\.4 /);
    expect(await rcpt("ORCPT=rfc822;not-an-address")).toMatch(/^501 5\.5\.4 /);
    expect(await rcpt("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40remote.test")).toMatch(/^250 /);

    const mailWith = async (params: string) =>
      (await dialog(p.ports.mx, ["EHLO c.test", `${mail} ${params}`]))[2]!;
    expect(await mailWith("RET=BODY")).toMatch(/^501 5\.5\.4 /);
    expect(await mailWith(`ENVID=${"x".repeat(101)}`)).toMatch(/^501 5\.5\.4 /);
    expect(await mailWith("ENVID=caf+C3+A9")).toMatch(/^501 5\.5\.4 /);
    expect(await mailWith("RET=HDRS ENVID=ok+2Bid")).toMatch(/^250 /);
  });
});

describe("DSN parameters in the report", () => {
  it("a failure DSN carries Original-Envelope-Id and Original-Recipient; NOTIFY=NEVER sends none", async () => {
    const never = await submit().sendMail({
      envelope: { from: "alice@example.test", to: ["gone@remote.test"] },
      raw: message("dsn never"),
      dsn: { notify: "NEVER" },
    } as never);
    const neverId = queueIdOf(never.response);
    const asked = await submit().sendMail({
      envelope: { from: "alice@example.test", to: ["gone@remote.test"] },
      raw: message("dsn asked"),
      dsn: { id: "env 42+x", return: "headers", notify: ["FAILURE"], recipient: "first@old.test" },
    } as never);
    expect(asked.response).toMatch(/^250 /);

    const report = await waitFor(
      async () => {
        for (const f of await p.mailbox("alice@example.test")) {
          const text = f.content.toString();
          if (text.includes("report-type=delivery-status") && text.includes("Subject: dsn asked"))
            return f.content;
        }
        return false;
      },
      { timeoutMs: 30_000, message: 'no failure DSN for "dsn asked" in alice\'s Maildir' },
    );
    const parsed = await simpleParser(report, { keepDeliveryStatus: true } as SimpleParserOptions);
    const status = parsed.attachments.find((a) => a.contentType === "message/delivery-status");
    expect(status).toBeDefined();
    const fields = status!.content.toString();
    expect(fields).toMatch(/^Original-Envelope-Id: env 42\+x\r?$/m);
    expect(fields).toMatch(/^Original-Recipient: rfc822; first@old\.test\r?$/m);
    expect(fields).toMatch(/^Final-Recipient: rfc822; gone@remote\.test\r?$/m);
    expect(fields).toMatch(/^Action: failed\r?$/m);
    expect(fields).toMatch(/^Status: 5\.1\.1\r?$/m);
    const returned = parsed.attachments.find((a) => a.contentType === "text/rfc822-headers");
    expect(returned?.content.toString()).toContain("Subject: dsn asked");
    expect(returned?.content.toString()).not.toContain("Body of dsn asked");

    // the NEVER message is final (its state is gone, a tombstone left) and no report names it
    await waitFor(
      async () => {
        const { stdout } = await exec("redis-cli", ["-u", p.redis.url, "EXISTS", `mailpipe:t:${neverId}`]);
        return stdout.trim() === "1";
      },
      { timeoutMs: 30_000, message: "the NOTIFY=NEVER message never became final" },
    );
    const box = await p.mailbox("alice@example.test");
    expect(box.filter((f) => f.content.toString().includes("Subject: dsn never"))).toHaveLength(0);
  }, 60_000);
});
