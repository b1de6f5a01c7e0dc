import { Readable } from "node:stream";
import { reply } from "@mailpipe/contracts";
import { simpleParser } from "mailparser";
import { describe, expect, it } from "vitest";
import { parseDeliveryStatus } from "../test/harness.ts";
import { buildDsn, type DsnInput, dsnStatus, foldField, readHeaderBlock } from "./dsn.ts";

const base: DsnInput = {
  kind: "failure",
  reportingMta: "mail.example.test",
  to: "alice@example.test",
  queueId: "01JQ0000000000000000000000",
  arrivalDate: new Date("2025-03-04T09:00:00Z"),
  recipients: [],
  date: new Date("2025-03-04T10:00:00Z"),
  messageId: "01JQ0000000000000000000001@mail.example.test",
};

async function parse(raw: Buffer) {
  const mail = await simpleParser(raw, { keepDeliveryStatus: true });
  const status = mail.attachments.find((a) => a.contentType === "message/delivery-status");
  const headers = mail.attachments.find((a) => a.contentType === "text/rfc822-headers");
  return {
    mail,
    report: parseDeliveryStatus(status?.content.toString("utf8") ?? ""),
    headers: headers?.content.toString("latin1"),
  };
}

describe("DSN", () => {
  it("a success notice says delivered or relayed, with a 2.x.x status and the headers only", async () => {
    const built = buildDsn({
      ...base,
      kind: "success",
      envid: "env-1",
      recipients: [
        {
          finalRecipient: "bob@example.test",
          originalRecipient: "bob@old.test",
          action: "delivered",
          status: dsnStatus("delivered", reply(250, "2.0.0", "delivered to the mailbox")),
        },
        {
          finalRecipient: "carol@plain.test",
          action: "relayed",
          // a next hop's reply without an enhanced code of its own still reads as a success
          status: dsnStatus("relayed", reply(250, "4.0.0", "odd")),
          remoteMta: "mx.plain.test [127.0.0.3]",
        },
      ],
      headers: Buffer.from("From: alice@example.test\r\nSubject: Hi\r\n"),
    });
    const { mail, report, headers } = await parse(built.raw);
    expect(mail.subject).toBe("Successful Mail Delivery Report");
    expect(mail.text).toContain("<bob@example.test> (sent to <bob@old.test>): delivered");
    expect(mail.text).toContain("<carol@plain.test>: relayed (from mx.plain.test [127.0.0.3])");
    expect(report.perMessage).toMatchObject({ "original-envelope-id": "env-1" });
    expect(report.recipients).toEqual([
      expect.objectContaining({
        action: "delivered",
        status: "2.0.0",
        "original-recipient": "rfc822; bob@old.test",
      }),
      expect.objectContaining({
        action: "relayed",
        status: "2.0.0",
        "remote-mta": "dns; mx.plain.test [127.0.0.3]",
      }),
    ]);
    expect(headers).toContain("Subject: Hi");
  });

  it("is an RFC 3464 report with per-message and per-recipient fields", async () => {
    const built = buildDsn({
      ...base,
      recipients: [
        {
          finalRecipient: "friend@remote.test",
          originalRecipient: "fwd@example.test",
          action: "failed",
          status: "5.1.1",
          remoteMta: "mx1.remote.test",
          diagnostic: reply(550, "5.1.1", "no such user"),
          lastAttemptDate: new Date("2025-03-04T09:30:00Z"),
        },
      ],
      headers: Buffer.from(
        "From: Alice <alice@example.test>\r\nSubject: Hi\r\nMessage-ID: <m1@example.test>\r\n",
      ),
    });
    const { mail, report, headers } = await parse(built.raw);
    expect(mail.headers.get("content-type")).toMatchObject({
      value: "multipart/report",
      params: expect.objectContaining({ "report-type": "delivery-status" }),
    });
    expect(mail.subject).toBe("Undelivered Mail Returned to Sender");
    expect(mail.messageId).toBe("<01JQ0000000000000000000001@mail.example.test>");
    expect(mail.text).toContain("<friend@remote.test> (sent to <fwd@example.test>): 550 5.1.1 no such user");
    expect(report.perMessage).toMatchObject({
      "reporting-mta": "dns; mail.example.test",
      "arrival-date": "Tue, 4 Mar 2025 09:00:00 +0000",
    });
    expect(report.recipients).toEqual([
      {
        "original-recipient": "rfc822; fwd@example.test",
        "final-recipient": "rfc822; friend@remote.test",
        action: "failed",
        status: "5.1.1",
        "remote-mta": "dns; mx1.remote.test",
        "diagnostic-code": "smtp; 550 5.1.1 no such user",
        "last-attempt-date": "Tue, 4 Mar 2025 09:30:00 +0000",
      },
    ]);
    expect(headers).toContain("Message-ID: <m1@example.test>");
    expect(built).toMatchObject({ eightBit: false, utf8Address: false });
  });

  it("names the sender's ENVID in Original-Envelope-Id, first among the per-message fields", async () => {
    const built = buildDsn({
      ...base,
      envid: "batch 7+a",
      recipients: [{ finalRecipient: "x@remote.test", action: "failed", status: "5.1.1" }],
    });
    const { report } = await parse(built.raw);
    expect(report.perMessage["original-envelope-id"]).toBe("batch 7+a");
    expect(Object.keys(report.perMessage)[0]).toBe("original-envelope-id");
    const without = await parse(buildDsn({ ...base, recipients: [] }).raw);
    expect(without.report.perMessage["original-envelope-id"]).toBeUndefined();
  });

  it("keeps every line CRLF-terminated and within 998 octets, and the report part 7-bit", async () => {
    const longText = `${"x".repeat(1500)} ${"word ".repeat(600)}déjà vu`;
    const built = buildDsn({
      ...base,
      kind: "delay",
      recipients: [
        {
          finalRecipient: "someone@remote.test",
          action: "delayed",
          status: "4.2.2",
          diagnostic: reply(452, "4.2.2", longText),
          willRetryUntil: new Date("2025-03-09T09:00:00Z"),
        },
      ],
      headers: Buffer.concat([
        Buffer.from(`Subject: ${"y".repeat(2500)}\nX-Name: `),
        Buffer.from("Zoë", "utf8"),
        Buffer.from("\n"),
      ]),
    });
    const raw = built.raw.toString("latin1");
    expect(raw.endsWith("\r\n")).toBe(true);
    expect(raw.replace(/\r\n/g, "")).not.toMatch(/[\r\n]/);
    for (const line of raw.split("\r\n")) expect(Buffer.byteLength(line, "latin1")).toBeLessThanOrEqual(998);
    expect(built.eightBit).toBe(true);

    const { mail, report, headers } = await parse(built.raw);
    expect(mail.subject).toBe("Delayed Mail (still being retried)");
    const r = report.recipients[0]!;
    expect(r).toMatchObject({
      action: "delayed",
      status: "4.2.2",
      "will-retry-until": "Sun, 9 Mar 2025 09:00:00 +0000",
    });
    expect(r["diagnostic-code"]).toContain("d\\x{E9}j\\x{E0} vu");
    expect(r["diagnostic-code"]!.replace(/ /g, "")).toContain("x".repeat(1500));
    expect(mail.text).toContain("déjà vu");
    expect(headers).toContain(Buffer.from("Zoë", "utf8").toString("latin1"));
  });

  it("reports an expiry after temporary failures as 4.4.7, a permanent reply with its own code", () => {
    expect(dsnStatus("failed", reply(451, "4.4.1", "refused"))).toBe("4.4.7");
    expect(dsnStatus("failed", reply(550, "5.7.1", "denied"))).toBe("5.7.1");
    expect(dsnStatus("delayed", reply(451, "4.4.1", "refused"))).toBe("4.4.1");
    expect(dsnStatus("failed", undefined)).toBe("5.0.0");
  });

  it("folds long fields at spaces", () => {
    const folded = foldField("Diagnostic-Code", `smtp; 550 5.1.1 ${"word ".repeat(40).trim()}`);
    const lines = folded.split("\r\n");
    expect(lines.length).toBeGreaterThan(1);
    for (const l of lines) expect(l.length).toBeLessThanOrEqual(78);
    expect(lines.slice(1).every((l) => l.startsWith(" "))).toBe(true);
  });

  it("reads only the header block of a stored body", async () => {
    let pulled = 0;
    const chunks = [
      "From: a@b.test\r\nSubj",
      "ect: hi\r\n\r\nbody line 1\r\n",
      "body line 2\r\n",
      "never read\r\n",
    ];
    // one chunk per read and a one-byte buffer: the reader pulls at most one chunk ahead
    const store = {
      read: async () => {
        let i = 0;
        return new Readable({
          highWaterMark: 1,
          read() {
            const c = chunks[i++];
            if (c !== undefined) pulled++;
            this.push(c === undefined ? null : Buffer.from(c));
          },
        });
      },
    };
    const ref = { bucket: "b", key: "k", size: 1, sha256: "0".repeat(64) };
    const headers = await readHeaderBlock(store, ref);
    expect(headers.toString()).toBe("From: a@b.test\r\nSubject: hi\r\n");
    expect(pulled).toBeLessThan(chunks.length);

    chunks.splice(0, chunks.length, "From: a@b.test\nSubject: lf\n\nbody\n");
    expect((await readHeaderBlock(store, ref)).toString()).toBe("From: a@b.test\nSubject: lf\n");
    chunks.splice(0, chunks.length, `X-Long: ${"z".repeat(5000)}`);
    expect((await readHeaderBlock(store, ref, 1000)).length).toBe(1000);
  });
});
