import { SmtpError } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import { freePort } from "@mailpipe/testing";
import { describe, expect, it } from "vitest";
import { z } from "zod";
import { filterConfig, filterSettings } from "./config.ts";
import {
  applyVerdict,
  ContentFilter,
  type ContentFilterOptions,
  sanitizeReplyText,
  spamHeaders,
} from "./filter.ts";
import { parseAnswer, RspamdError, type RspamdVerdict } from "./rspamd.ts";

const verdict = (over: Partial<RspamdVerdict> = {}): RspamdVerdict => ({
  action: "no action",
  score: 1.5,
  required: 15,
  addHeaders: [],
  removeHeaders: [],
  symbols: [],
  ...over,
});

const message = [
  Buffer.from("From: a@sender.test\r\nSubject: hello\r\nX-Tag: one\r\n"),
  Buffer.from("X-Tag: two\r\nX-Tag: three\r\n\r\nbody line\r\nX-Tag: not a header\r\n"),
];
const text = (r: { prepend: string | Buffer; chunks: readonly Buffer[] }) =>
  Buffer.concat([Buffer.from(r.prepend), ...r.chunks]).toString("latin1");

describe("rspamd's answer", () => {
  it("reads action, score, message, subject, milter headers and the top symbols", () => {
    const v = parseAnswer(
      JSON.stringify({
        action: "reject",
        score: 20.5,
        required_score: 15,
        subject: "[SPAM] hi",
        messages: { smtp_message: "Gtube pattern" },
        symbols: { A: { score: 0.1 }, B: { score: 20 }, C: { score: -3 } },
        milter: {
          add_headers: { "X-One": { value: "1", order: 1 }, "X-Two": "2", "X-Many": [{ value: "a" }, "b"] },
          remove_headers: { "X-Spam": 0, "DKIM-Signature": -1 },
        },
      }),
    );
    expect(v).toMatchObject({ action: "reject", score: 20.5, required: 15, smtpMessage: "Gtube pattern" });
    expect(v.symbols).toEqual(["B", "C", "A"]);
    expect(v.addHeaders.map((h) => `${h.name}=${h.value}`)).toEqual([
      "X-Two=2",
      "X-Many=a",
      "X-Many=b",
      "X-One=1",
    ]);
    expect(v.removeHeaders).toEqual([
      { name: "X-Spam", index: 0 },
      { name: "DKIM-Signature", index: -1 },
    ]);
  });

  it("keeps a custom action as a marked message, and refuses what is not an answer", () => {
    expect(parseAnswer('{"action":"quarantine","score":9}')).toMatchObject({
      action: "add header",
      customAction: "quarantine",
    });
    expect(() => parseAnswer("<html>")).toThrow(RspamdError);
    expect(() => parseAnswer('{"error":"bad request"}')).toThrow(/no action/);
  });
});

describe("sanitizeReplyText", () => {
  it("makes one bounded line, and falls back when nothing is left", () => {
    expect(sanitizeReplyText("spam\r\n550 fake\tline\u0007", "x")).toBe("spam 550 fake line");
    expect(sanitizeReplyText("y".repeat(500), "x")).toHaveLength(200);
    expect(sanitizeReplyText("\r\n", "fallback")).toBe("fallback");
    expect(sanitizeReplyText(undefined, "fallback")).toBe("fallback");
  });
});

describe("applyVerdict", () => {
  it("only prepends when nothing is removed or rewritten: the message's chunks are the same objects", () => {
    const out = applyVerdict(
      { prepend: "Received: x\r\n", chunks: message, hasSpamHeaders: false },
      verdict(),
      spamHeaders(verdict()),
    );
    expect(out.chunks).toBe(message);
    expect(out.prepend).toBe(
      "Received: x\r\nX-Spam-Score: 1.50\r\nX-Spam-Status: No, score=1.50 required=15.00\r\nX-Spam-Action: no action\r\n",
    );
  });

  it("removes fields by rspamd's index rules (0 all, n the n-th, -n from the end), never in the body", () => {
    const first = applyVerdict(
      { prepend: "", chunks: message, hasSpamHeaders: false },
      verdict({ removeHeaders: [{ name: "x-tag", index: 1 }] }),
      [],
    );
    expect(text(first)).not.toContain("X-Tag: one");
    expect(text(first)).toContain("X-Tag: two\r\nX-Tag: three\r\n\r\nbody line\r\nX-Tag: not a header\r\n");
    const last = applyVerdict(
      { prepend: "", chunks: message, hasSpamHeaders: false },
      verdict({ removeHeaders: [{ name: "X-Tag", index: -1 }] }),
      [],
    );
    expect(text(last)).toContain("X-Tag: one\r\nX-Tag: two\r\n\r\n");
    const all = applyVerdict(
      { prepend: "X-Tag: ours\r\n", chunks: message, hasSpamHeaders: false },
      verdict({ removeHeaders: [{ name: "X-Tag", index: 0 }] }),
      [],
    );
    expect(text(all)).toBe(
      "From: a@sender.test\r\nSubject: hello\r\n\r\nbody line\r\nX-Tag: not a header\r\n",
    );
  });

  it("rewrites the Subject (RFC 2047 when it is not ASCII) and drops forged X-Spam-* fields", () => {
    const forged = [
      Buffer.from("X-Spam-Flag: NO\r\nSubject: hi\r\nX-Spam-Status: No,\r\n score=-50\r\n\r\nbody\r\n"),
    ];
    const out = applyVerdict(
      { prepend: "Received: x\r\n", chunks: forged, hasSpamHeaders: true },
      verdict({ action: "rewrite subject", subject: "[SPAM] hï\r\nBcc: evil@x.test", score: 9 }),
      spamHeaders(verdict({ action: "rewrite subject", score: 9 })),
    );
    const t = text(out);
    expect(t).toMatch(/^Received: x\r\nX-Spam-Flag: YES\r\nX-Spam-Score: 9\.00\r\n/);
    expect(t).not.toContain("score=-50");
    expect(t).not.toContain("X-Spam-Flag: NO");
    expect(t).not.toMatch(/^Bcc:/m);
    const subject = /^Subject: (.*)\r\n/m.exec(t)?.[1];
    expect(subject).toMatch(/^=\?UTF-8\?B\?[A-Za-z0-9+/=]+\?=$/);
    expect(Buffer.from(subject!.slice(10, -2), "base64").toString()).toBe("[SPAM] hï Bcc: evil@x.test");
    expect(t.endsWith("\r\n\r\nbody\r\n")).toBe(true);
  });

  it("adds rspamd's fields with valid names only, folded values kept folded", () => {
    const out = applyVerdict(
      { prepend: "", chunks: message, hasSpamHeaders: false },
      verdict({
        addHeaders: [
          { name: "X-Rspamd-Result", value: "one\ntwo", order: 0 },
          { name: "Bad Name", value: "x", order: 0 },
          { name: "X-Inject", value: "a\r\nBcc: evil@x.test", order: 0 },
        ],
      }),
      [],
    );
    expect(out.prepend).toBe("X-Rspamd-Result: one\r\n two\r\nX-Inject: a\r\n Bcc: evil@x.test\r\n");
  });
});

describe("filter configuration", () => {
  const schema = z.object(filterConfig);

  it("is off without RSPAMD_URL (also when it is empty), with the documented defaults when set", () => {
    expect(filterSettings(schema.parse({}), { modify: true })).toBeUndefined();
    expect(filterSettings(schema.parse({ RSPAMD_URL: "" }), { modify: true })).toBeUndefined();
    expect(filterSettings(schema.parse({ RSPAMD_URL: "http://rspamd:11333" }), { modify: false })).toEqual({
      url: "http://rspamd:11333",
      timeoutMs: 10_000,
      failMode: "tempfail",
      maxSize: 10 * 1024 * 1024,
      password: undefined,
      settingsId: undefined,
      modify: false,
    });
  });

  it("refuses a URL that is not http(s) and a fail mode it does not know", () => {
    expect(schema.safeParse({ RSPAMD_URL: "rspamd:11333" }).success).toBe(false);
    expect(schema.safeParse({ RSPAMD_URL: "ftp://rspamd" }).success).toBe(false);
    expect(schema.safeParse({ FILTER_FAIL_MODE: "pass" }).success).toBe(false);
  });
});

describe("ContentFilter without an answer", () => {
  const telemetry = createTelemetry({ service: "mx", logLevel: "silent", defaultMetrics: false });
  const input = (size: number) => ({
    queueId: "01J0000000000000000000000Q",
    mailFrom: "a@sender.test",
    recipients: ["alice@example.test"],
    ip: "192.0.2.1",
    helo: "client.sender.test",
    mtaName: "mx.test",
    prepend: "Received: x\r\n",
    chunks: [Buffer.from("Subject: hi\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n")],
    size,
    hasSpamHeaders: true,
    smtputf8: false,
  });
  const filter = async (over: Partial<ContentFilterOptions>) =>
    new ContentFilter(
      {
        url: `http://127.0.0.1:${await freePort()}`, // nothing listens there
        timeoutMs: 2000,
        failMode: "tempfail",
        maxSize: 1024,
        modify: true,
        ...over,
      },
      telemetry,
    );

  it("refuses with 451 4.7.1 while rspamd is unreachable (tempfail), and counts the failure", async () => {
    const f = await filter({});
    const err = await f.check(input(40)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SmtpError);
    expect((err as SmtpError).reply).toMatchObject({ code: 451, enhanced: "4.7.1" });
    expect(
      await telemetry.metrics.registry.getSingleMetricAsString("mailpipe_filter_failures_total"),
    ).toMatch(/reason="unavailable"[^\n]* 1/);
    f.close();
  });

  it("takes the message unfiltered with FILTER_FAIL_MODE=accept, forged X-Spam-* fields removed", async () => {
    const f = await filter({ failMode: "accept" });
    const out = await f.check(input(40));
    expect(out.verdict).toEqual({ action: "failed" });
    expect(text(out)).toBe("Received: x\r\nSubject: hi\r\n\r\nbody\r\n");
    f.close();
  });

  it("does not send a message over FILTER_MAX_SIZE", async () => {
    const f = await filter({ maxSize: 10 });
    const out = await f.check(input(40));
    expect(out.verdict).toEqual({ action: "skipped" });
    f.close();
  });
});
