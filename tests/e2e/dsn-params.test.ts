// RFC 3461 DSN parameters end to end: mx and msa advertise DSN and check NOTIFY, RET, ENVID and
// ORCPT (501 5.5.4 for bad values); a submitted message's ENVID and ORCPT come back in the failure
// report (read with mailparser), and NOTIFY=NEVER suppresses the bounce. NOTIFY=SUCCESS brings a
// success report: "delivered" for a mailbox, "relayed" for a next hop without DSN; a next hop that
// has DSN gets NOTIFY, ORCPT, RET and ENVID passed on, and then the success report is its to send.
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
  "plain.test": { MX: [{ exchange: "mx.plain.test", priority: 10 }] },
  "mx.plain.test": { A: ["127.0.0.3"] },
  "dsn.test": { MX: [{ exchange: "mx.dsn.test", priority: 10 }] },
  "mx.dsn.test": { A: ["127.0.0.4"] },
};

let p: Pipeline;
let mx1: SmtpPeer;
/** a next hop without DSN (smtp-server hides it by default) */
let plain: SmtpPeer;
/** a next hop that advertises DSN */
let withDsn: SmtpPeer;

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
  plain = await startSmtpPeer({ host: "127.0.0.3", port: p.ports.remoteSmtp, name: "mx.plain.test" });
  withDsn = await startSmtpPeer({
    host: "127.0.0.4",
    port: p.ports.remoteSmtp,
    name: "mx.dsn.test",
    smtpOptions: { hideDSN: false },
  });
}, 120_000);

afterAll(async () => {
  await withDsn?.stop();
  await plain?.stop();
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

function message(subject: string, to = "gone@remote.test"): string {
  return ["From: alice@example.test", `To: ${to}`, `Subject: ${subject}`, "", `Body of ${subject}.`, ""].join(
    "\r\n",
  );
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

/** The delivery-status part of the report about `subject` in `owner`'s Maildir, once it is there. */
async function reportIn(owner: string, reportSubject: string, subject: string) {
  const raw = await waitFor(
    async () => {
      for (const f of await p.mailbox(owner)) {
        const text = f.content.toString();
        if (text.includes(`Subject: ${reportSubject}`) && text.includes(`Subject: ${subject}`))
          return f.content;
      }
      return false;
    },
    { timeoutMs: 30_000, message: `no "${reportSubject}" about "${subject}" in ${owner}'s Maildir` },
  );
  const parsed = await simpleParser(raw, { keepDeliveryStatus: true } as SimpleParserOptions);
  const status = parsed.attachments.find((a) => a.contentType === "message/delivery-status");
  expect(status).toBeDefined();
  return { parsed, fields: status!.content.toString() };
}

async function finished(queueId: string): Promise<void> {
  await waitFor(
    async () => {
      const { stdout } = await exec("redis-cli", ["-u", p.redis.url, "EXISTS", `mailpipe:t:${queueId}`]);
      return stdout.trim() === "1";
    },
    { timeoutMs: 30_000, message: `message ${queueId} never became final` },
  );
}

describe("success notices (NOTIFY=SUCCESS)", () => {
  it('a local delivery is reported "delivered", with the ENVID, the ORCPT and the headers only', async () => {
    const sent = await submit().sendMail({
      envelope: { from: "alice@example.test", to: ["bob@example.test"] },
      raw: message("dsn success local", "bob@example.test"),
      dsn: { id: "env-local-1", return: "full", notify: ["SUCCESS", "FAILURE"], recipient: "bob@old.test" },
    } as never);
    expect(sent.response).toMatch(/^250 /);

    const { parsed, fields } = await reportIn(
      "alice@example.test",
      "Successful Mail Delivery Report",
      "dsn success local",
    );
    expect(parsed.from?.text).toContain("MAILER-DAEMON@");
    expect(fields).toMatch(/^Original-Envelope-Id: env-local-1\r?$/m);
    expect(fields).toMatch(/^Original-Recipient: rfc822; bob@old\.test\r?$/m);
    expect(fields).toMatch(/^Final-Recipient: rfc822; bob@example\.test\r?$/m);
    expect(fields).toMatch(/^Action: delivered\r?$/m);
    expect(fields).toMatch(/^Status: 2\.\d{1,3}\.\d{1,3}\r?$/m);
    // RET=FULL is for failures: a success report returns the headers
    const returned = parsed.attachments.find((a) => a.contentType === "text/rfc822-headers");
    expect(returned?.content.toString()).toContain("Subject: dsn success local");
    expect(parsed.attachments.some((a) => a.contentType === "message/rfc822")).toBe(false);
    // and the message itself is in bob's mailbox
    const box = await p.mailbox("bob@example.test");
    expect(box.some((f) => f.content.toString().includes("Subject: dsn success local"))).toBe(true);
  }, 60_000);

  it('a next hop without DSN: the report says "relayed" and names it; nothing is passed on', async () => {
    const sent = await submit().sendMail({
      envelope: { from: "alice@example.test", to: ["carol@plain.test"] },
      raw: message("dsn success relayed", "carol@plain.test"),
      dsn: { id: "env-relayed", notify: ["SUCCESS"] },
    } as never);
    expect(sent.response).toMatch(/^250 /);

    const { fields } = await reportIn(
      "alice@example.test",
      "Successful Mail Delivery Report",
      "dsn success relayed",
    );
    expect(fields).toMatch(/^Final-Recipient: rfc822; carol@plain\.test\r?$/m);
    expect(fields).toMatch(/^Action: relayed\r?$/m);
    expect(fields).toMatch(/^Status: 2\.\d{1,3}\.\d{1,3}\r?$/m);
    expect(fields).toMatch(/^Remote-MTA: dns; mx\.plain\.test \[127\.0\.0\.3\]\r?$/m);
    expect(fields).toMatch(/^Original-Envelope-Id: env-relayed\r?$/m);

    const got = plain.messages.find((m) => m.raw.toString().includes("Subject: dsn success relayed"));
    expect(got?.rcptTo).toEqual(["carol@plain.test"]);
    expect(got?.mailParams).not.toHaveProperty("ENVID");
    expect(got?.rcptParams["carol@plain.test"]).not.toHaveProperty("NOTIFY");
  }, 60_000);

  it("a next hop with DSN gets NOTIFY, ORCPT, RET and ENVID per recipient, and no success report comes from us", async () => {
    const sent = await submit().sendMail({
      envelope: { from: "alice@example.test", to: ["dave@dsn.test"] },
      raw: message("dsn success passed on", "dave@dsn.test"),
      dsn: { id: "env 3+x", return: "headers", notify: ["SUCCESS", "FAILURE"], recipient: "dave@old.test" },
    } as never);
    const queueId = queueIdOf(sent.response);

    const [got] = await waitFor(
      async () => {
        const m = withDsn.messages.filter((x) => x.raw.toString().includes("Subject: dsn success passed on"));
        return m.length > 0 ? m : false;
      },
      { timeoutMs: 30_000, message: "the message never reached the next hop with DSN" },
    );
    expect(got!.mailParams).toMatchObject({ RET: "HDRS" });
    // written as xtext (the space and the + encoded), decoded by smtp-server: what the sender gave
    expect(got!.mailParams.ENVID).toBe("env 3+x");
    expect(got!.rcptParams["dave@dsn.test"]).toMatchObject({
      NOTIFY: "SUCCESS,FAILURE",
      ORCPT: "rfc822;dave@old.test",
    });

    await finished(queueId);
    const box = await p.mailbox("alice@example.test");
    const reports = box.filter((f) => {
      const t = f.content.toString();
      return t.includes("report-type=delivery-status") && t.includes("Subject: dsn success passed on");
    });
    expect(reports).toHaveLength(0);
  }, 60_000);

  it("NOTIFY is per recipient: only the one that asked is reported, to the sender's own server", async () => {
    const replies = await dialog(p.ports.mx, [
      "EHLO mail.plain.test",
      "MAIL FROM:<erin@plain.test> ENVID=per-rcpt",
      "RCPT TO:<alice@example.test> NOTIFY=SUCCESS ORCPT=rfc822;alice+40former.test",
      "RCPT TO:<bob@example.test>",
      "DATA",
      "From: erin@plain.test\r\nTo: alice@example.test, bob@example.test\r\nSubject: dsn per recipient\r\n\r\nHello.\r\n.",
    ]);
    expect(replies.slice(2)).toEqual([
      expect.stringMatching(/^250 /),
      expect.stringMatching(/^250 /),
      expect.stringMatching(/^250 /),
      expect.stringMatching(/^354 /),
      expect.stringMatching(/^250 /),
    ]);

    const [report] = await waitFor(
      async () => {
        const m = plain.messages.filter(
          (x) => x.mailFrom === "" && x.raw.toString().includes("Subject: dsn per recipient"),
        );
        return m.length > 0 ? m : false;
      },
      { timeoutMs: 30_000, message: "no success report reached the sender's server" },
    );
    expect(report!.rcptTo).toEqual(["erin@plain.test"]);
    const parsed = await simpleParser(report!.raw, { keepDeliveryStatus: true } as SimpleParserOptions);
    expect(parsed.subject).toBe("Successful Mail Delivery Report");
    const fields = parsed.attachments
      .find((a) => a.contentType === "message/delivery-status")!
      .content.toString();
    expect(fields).toMatch(/^Original-Envelope-Id: per-rcpt\r?$/m);
    expect(fields).toMatch(/^Original-Recipient: rfc822; alice@former\.test\r?$/m);
    expect(fields).toMatch(/^Final-Recipient: rfc822; alice@example\.test\r?$/m);
    expect(fields).toMatch(/^Action: delivered\r?$/m);
    // bob gave no NOTIFY: the default reports failures only
    expect(fields).not.toContain("bob@example.test");
  }, 60_000);
});
