import { describe, expect, it } from "vitest";
import {
  ContractError,
  decode,
  decodeJson,
  destinationFromToken,
  destinationToken,
  formatReply,
  isQueueId,
  LocalDeliveryRequest,
  MailEvent,
  newQueueId,
  parseAddress,
  parseRemoteReply,
  QueuedMail,
  queueIdTime,
  RecipientStatus,
  RemoteDeliveryRequest,
  replies,
  SmtpError,
  SubjectError,
  subjects,
  trackHash,
} from "./index.ts";

const body = { bucket: "mail-bodies", key: "01J0000000000000000000000A", size: 42, sha256: "a".repeat(64) };

function queued(): QueuedMail {
  return {
    v: 1,
    queueId: newQueueId(),
    source: "mx",
    receivedAt: new Date().toISOString(),
    envelope: {
      mailFrom: "sender@remote.test",
      rcptTo: [
        { address: "alice@example.test" },
        { address: "bob@example.test", original: "team@example.test" },
      ],
      smtputf8: false,
      bodyType: "8BITMIME",
    },
    body,
    client: { ip: "127.0.0.1", helo: "client.remote.test", tls: true },
    messageId: "<x@remote.test>",
  };
}

describe("message contracts round-trip through JSON", () => {
  it("queued mail", () => {
    const m = queued();
    expect(decodeJson(QueuedMail, JSON.stringify(m))).toEqual(m);
  });

  it("queued mail with RFC 3461 parameters, and without them (mail queued before they existed)", () => {
    const m = queued();
    m.envelope.dsn = { ret: "HDRS", envid: "batch 7+a" };
    m.envelope.rcptTo[0] = { address: "alice@example.test", notify: ["SUCCESS", "FAILURE"] };
    expect(decodeJson(QueuedMail, JSON.stringify(m))).toEqual(m);
    expect(decodeJson(QueuedMail, JSON.stringify(queued())).envelope.dsn).toBeUndefined();
    const bad = (dsn: unknown) => () => decode(QueuedMail, { ...m, envelope: { ...m.envelope, dsn } });
    expect(bad({ envid: "x".repeat(101) })).toThrow(/envid/);
    expect(bad({ envid: "caf\u00e9" })).toThrow(/printable ASCII/);
    expect(bad({ ret: "BODY" })).toThrow(/ret/);
  });

  it("queued mail with a null sender (a DSN)", () => {
    const m = { ...queued(), source: "dsn" as const, client: undefined };
    m.envelope.mailFrom = "";
    delete m.client;
    m.dsn = { of: newQueueId(), kind: "failure" };
    expect(decodeJson(QueuedMail, JSON.stringify(m))).toEqual(m);
  });

  it("local and remote delivery requests, status and events", () => {
    const queueId = newQueueId();
    const local: LocalDeliveryRequest = {
      v: 1,
      queueId,
      dispatchId: `${queueId}.local.1`,
      receivedAt: new Date().toISOString(),
      mailFrom: "",
      recipients: [
        { mailbox: "alice@example.test", address: "alice+news@example.test", folder: "news", attempt: 1 },
      ],
      body,
    };
    expect(decodeJson(LocalDeliveryRequest, JSON.stringify(local))).toEqual(local);

    const remote: RemoteDeliveryRequest = {
      v: 1,
      queueId,
      dispatchId: `${queueId}.remote_test.1`,
      receivedAt: new Date().toISOString(),
      mailFrom: "alice@example.test",
      destination: {
        domain: "remote.test",
        hosts: [{ exchange: "mx1.remote.test", priority: 10, addresses: ["127.0.0.2"] }],
      },
      recipients: [{ address: "bob@remote.test", attempt: 2 }],
      smtputf8: false,
      bodyType: "7BIT",
      body,
    };
    expect(decodeJson(RemoteDeliveryRequest, JSON.stringify(remote))).toEqual(remote);

    const status: RecipientStatus = {
      v: 1,
      queueId,
      dispatchId: remote.dispatchId,
      recipient: "bob@remote.test",
      outcome: "deferred",
      reply: parseRemoteReply(451, "4.7.1 greylisted, come back later"),
      attempt: 2,
      service: "delivery",
      at: new Date().toISOString(),
      remoteMta: "mx1.remote.test [127.0.0.2]",
      destination: "remote.test",
    };
    expect(decodeJson(RecipientStatus, JSON.stringify(status))).toEqual(status);

    const event: MailEvent = {
      v: 1,
      type: "deferred",
      at: new Date().toISOString(),
      service: "delivery",
      queueId,
      traceId: "0af7651916cd43dd8448eb211c80319c",
      recipient: "bob@remote.test",
      reply: status.reply,
    };
    expect(decodeJson(MailEvent, JSON.stringify(event))).toEqual(event);
  });
});

describe("malformed messages are rejected with a readable error", () => {
  it("names the missing and the wrong fields", () => {
    const m = queued() as Record<string, unknown>;
    delete m.body;
    (m.envelope as { rcptTo: unknown[] }).rcptTo = [{ address: "not-an-address" }];
    const err = (() => {
      try {
        decode(QueuedMail, m, "queued mail");
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(ContractError);
    expect((err as Error).message).toMatch(/^invalid queued mail: /);
    expect((err as Error).message).toContain("envelope.rcptTo.0.address: must be a mailbox");
    expect((err as Error).message).toContain("body:");
  });

  it("is strict: unknown fields and other versions are refused", () => {
    expect(() => decode(QueuedMail, { ...queued(), extra: 1 })).toThrow(/Unrecognized key.*extra/);
    expect(() => decode(QueuedMail, { ...queued(), v: 2 })).toThrow(/v:/);
  });

  it("refuses what is not JSON", () => {
    expect(() => decodeJson(QueuedMail, "{nope", "queued mail")).toThrow(
      /invalid queued mail: \(root\): not JSON/,
    );
  });

  it("refuses a bad queue id, a bad sha256 and an unknown outcome", () => {
    const s = {
      v: 1,
      queueId: "not-a-ulid",
      dispatchId: "d",
      recipient: "bob@remote.test",
      outcome: "lost",
      reply: { code: 250, enhanced: "2.0.0", text: "ok" },
      attempt: 1,
      service: "delivery",
      at: new Date().toISOString(),
    };
    expect(() => decode(RecipientStatus, s)).toThrow(/queueId: must be a queue ID[\s\S]*outcome/);
    expect(() => decode(QueuedMail, { ...queued(), body: { ...body, sha256: "xyz" } })).toThrow(
      /body.sha256/,
    );
  });
});

describe("addresses", () => {
  it("normalises the domain and keeps the local part", () => {
    expect(parseAddress("Alice@EXAMPLE.test")).toEqual({
      local: "Alice",
      domain: "example.test",
      address: "Alice@example.test",
    });
    expect(parseAddress("pelé@bücher.test")?.domain).toBe("xn--bcher-kva.test");
    expect(parseAddress('"odd local"@example.test')?.local).toBe('"odd local"');
  });

  it("refuses relay tricks and malformed addresses", () => {
    for (const bad of [
      "user@[127.0.0.1]",
      "@hop.test:user@example.test",
      "user",
      "user@",
      "user@-bad-.test",
      "a..b@example.test",
      "us er@example.test",
    ]) {
      expect(parseAddress(bad), bad).toBeNull();
    }
  });
});

describe("subjects", () => {
  it("builds every subject and encodes a destination as one token", () => {
    expect(subjects.queued()).toBe("mail.v1.spool");
    expect(subjects.queuedLegacy()).toBe("mail.v1.queued");
    expect(subjects.deliverRemote("Mail.Remote.test")).toBe("mail.v1.deliver.remote.mail_remote_test");
    expect(destinationFromToken(destinationToken("a-b.remote.test"))).toBe("a-b.remote.test");
    expect(subjects.status("bounced")).toBe("mail.v1.status.bounced");
    // one message's events share one literal subject: its queue id's bucket
    expect(subjects.event("delivered", "01JC0000000000000000000000")).toMatch(
      /^mail\.v1\.events\.[0-9a-f]{4}$/,
    );
    expect(subjects.event("received", "01JC0000000000000000000000")).toBe(
      subjects.eventsOfMessage("01JC0000000000000000000000"),
    );
    expect(subjects.event("rejected")).toBe("mail.v1.events._");
    // index keys: addresses case-insensitively, one bucket token each
    expect(subjects.trackIndex("addr", "Alice@Example.TEST")).toBe(
      subjects.trackIndex("addr", "alice@example.test"),
    );
    expect(trackHash("addr", "Alice@Example.TEST")).toBe(trackHash("addr", "alice@example.test"));
    expect(subjects.trackIndex("mid", "<a.b@c>")).toMatch(/^mail\.v1\.track\.mid\.[0-9a-f]{4}$/);
    expect(trackHash("mid", "<A@c>")).not.toBe(trackHash("mid", "<a@c>"));
  });

  it("refuses tokens that would add subject levels or wildcards", () => {
    expect(() => subjects.deliverRemote("*")).toThrow(SubjectError);
    expect(() => subjects.deliverRemote("evil.test >")).toThrow(SubjectError);
    expect(() => subjects.status("lost" as never)).toThrow(/unknown outcome/);
    expect(() => subjects.event("x.y" as never)).toThrow(/unknown event type/);
  });
});

describe("queue ids", () => {
  it("are unique, sortable and carry their time", () => {
    const ids = Array.from({ length: 1000 }, () => newQueueId());
    expect(new Set(ids).size).toBe(1000);
    expect([...ids].sort()).toEqual(ids);
    expect(ids.every(isQueueId)).toBe(true);
    expect(Math.abs(queueIdTime(ids[0]!) - Date.now())).toBeLessThan(5000);
  });

  it("count up within one millisecond, carry the given time, and spread over the whole random space", () => {
    const t = Date.now() + 86_400_000; // ahead of any id made before in this process
    const a = newQueueId(t);
    const b = newQueueId(t);
    const c = newQueueId(t - 10); // a clock step back stays in order too
    expect(queueIdTime(a)).toBe(t);
    expect(a < b && b < c).toBe(true);
    expect(queueIdTime(c)).toBe(t);
    // the random part went up by one
    const value = (id: string) =>
      [...id.slice(10)].reduce(
        (n, ch) => n * 32n + BigInt("0123456789ABCDEFGHJKMNPQRSTVWXYZ".indexOf(ch)),
        0n,
      );
    expect(value(b) - value(a)).toBe(1n);
    // fresh milliseconds draw fresh randomness, spread over all 80 bits: each of the 32 values shows
    // up in the first and in the last random digit
    const ids = Array.from({ length: 2000 }, (_, i) => newQueueId(t + 1 + i));
    expect(new Set(ids.map((id) => id.charAt(10))).size).toBe(32);
    expect(new Set(ids.map((id) => id.charAt(25))).size).toBe(32);
  });
});

describe("SMTP replies", () => {
  it("have the codes the design names", () => {
    expect(formatReply(replies.noSuchUser("x@example.test"))).toMatch(/^550 5\.1\.1 /);
    expect(formatReply(replies.relayDenied())).toMatch(/^550 5\.7\.1 /);
    expect(formatReply(replies.mailboxFull())).toMatch(/^452 4\.2\.2 /);
    expect(formatReply(replies.messageTooBig(10))).toMatch(/^552 5\.3\.4 /);
    expect(formatReply(replies.tooManyRecipients())).toMatch(/^452 4\.5\.3 /);
    expect(formatReply(replies.badRecipientSyntax())).toMatch(/^501 5\.1\.3 /);
    expect(formatReply(replies.localError())).toMatch(/^451 4\.3\.0 /);
    expect(formatReply(replies.authFailed())).toMatch(/^535 5\.7\.8 /);
    expect(formatReply(replies.nullMx("x.test"))).toMatch(/^556 5\.1\.10 /);
  });

  it("SmtpError carries the code for smtp-server and the enhanced code in its message", () => {
    const e = new SmtpError(replies.relayDenied());
    expect(e.responseCode).toBe(550);
    expect(e.message).toMatch(/^5\.7\.1 Relay access denied/);
  });

  it("parses remote replies with and without enhanced codes", () => {
    expect(parseRemoteReply(550, "5.1.1 <bob@remote.test>: user unknown")).toEqual({
      code: 550,
      enhanced: "5.1.1",
      text: "<bob@remote.test>: user unknown",
    });
    expect(parseRemoteReply(451, "try later")).toEqual({ code: 451, enhanced: "4.0.0", text: "try later" });
    // an enhanced code of the wrong class is text, not a status
    expect(parseRemoteReply(550, "4.2.2 full").enhanced).toBe("5.0.0");
  });
});

describe("fields from a newer version", () => {
  const status = {
    v: 1,
    queueId: newQueueId(),
    dispatchId: "d1",
    recipient: "bob@example.test",
    outcome: "delivered",
    reply: { code: 250, enhanced: "2.0.0", text: "ok" },
    attempt: 1,
    service: "mda",
    at: new Date().toISOString(),
  };

  it("are refused by default, and dropped and named when the reader tolerates them", () => {
    const newer = JSON.stringify({ ...status, mood: "happy", reply: { ...status.reply, extra: 1 } });
    expect(() => decodeJson(RecipientStatus, newer)).toThrow(/mood/);
    const seen: string[][] = [];
    const got = decodeJson(RecipientStatus, newer, "status", { onUnknownFields: (f) => seen.push(f) });
    expect(got).toEqual(status);
    expect(seen).toEqual([["mood", "reply.extra"]]);
  });

  it("do not excuse a field that is wrong", () => {
    const bad = JSON.stringify({ ...status, mood: "happy", attempt: 0 });
    expect(() => decodeJson(RecipientStatus, bad, "status", { onUnknownFields: () => undefined })).toThrow(
      /attempt/,
    );
  });
});
