// Content filtering end to end: a real rspamd (Debian's package, its own minimal configuration) in
// front of mx and msa; mx → router → mda → Maildir, real processes, real SMTP.
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { promisify } from "node:util";
import {
  freePort,
  GTUBE,
  RSPAMD_TEST_TRIGGERS,
  type RspamdHandle,
  repoRoot,
  startRspamd,
  waitFor,
} from "@mailpipe/testing";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { headersOf, type Pipeline, startPipeline } from "./harness.ts";

const exec = promisify(execFile);
let p: Pipeline;
let rspamd: RspamdHandle;

beforeAll(async () => {
  rspamd = await startRspamd();
  p = await startPipeline({
    services: ["mda", "router", "mx", "msa"],
    tracing: true,
    serviceEnv: {
      mx: { RSPAMD_URL: rspamd.url, RSPAMD_TIMEOUT: "20s" },
      msa: { RSPAMD_URL: rspamd.url, RSPAMD_TIMEOUT: "20s", RSPAMD_SETTINGS_ID: "outbound" },
    },
  });
}, 240_000);

afterAll(async () => {
  await p?.stop();
  await rspamd?.stop();
});

function message(subject: string, body: string, extraHeaders: string[] = []): string {
  return [
    "From: Sender <someone@sender.test>",
    "To: alice@example.test",
    `Subject: ${subject}`,
    `Message-ID: <${randomBytes(8).toString("hex")}@sender.test>`,
    "Date: Mon, 23 Nov 2026 10:02:00 +0000",
    ...extraHeaders,
    "",
    body,
    "",
  ].join("\r\n");
}

async function send(port: number, raw: string, to = "alice@example.test") {
  const t = nodemailer.createTransport({
    host: "127.0.0.1",
    port,
    secure: false,
    tls: { rejectUnauthorized: false },
    name: "client.sender.test",
  } as TransportOptions);
  try {
    return await t.sendMail({ envelope: { from: "someone@sender.test", to: [to] }, raw });
  } finally {
    t.close();
  }
}

async function refusal(port: number, raw: string): Promise<{ code: number; response: string }> {
  const err = await send(port, raw).then(
    () => undefined,
    (e: { responseCode: number; response: string }) => e,
  );
  if (!err) throw new Error("the message was accepted");
  return { code: err.responseCode, response: err.response };
}

/** The Maildir copy for alice whose Subject is `subject` (in INBOX, or in `folder`). */
async function arrived(subject: string, folder?: string) {
  return waitFor(
    async () => {
      for (const m of await p.mailbox("alice@example.test", folder)) {
        const h = headersOf(m.content);
        if (h.some((f) => f.name === "Subject" && f.value.includes(subject))) return { raw: m.content, h };
      }
      return undefined;
    },
    { timeoutMs: 30_000, message: `a message "${subject}" in alice's Maildir` },
  );
}

const field = (h: { name: string; value: string }[], name: string) =>
  h.filter((f) => f.name.toLowerCase() === name.toLowerCase()).map((f) => f.value);

describe("mx with rspamd", () => {
  it("refuses GTUBE with 550 5.7.1 and rspamd's message", async () => {
    const r = await refusal(p.ports.mx, message("gtube", GTUBE));
    expect(r.code).toBe(550);
    expect(r.response).toMatch(/^550 5\.7\.1 Gtube pattern$/);
  });

  it("accepts a clean message, and its Maildir copy carries the score", async () => {
    const subject = `clean ${randomBytes(4).toString("hex")}`;
    const info = await send(p.ports.mx, message(subject, "Hello Alice, lunch on Friday?"));
    const queueId = /queued as (\S+)/.exec(info.response)?.[1];
    const { h } = await arrived(subject);
    expect(field(h, "X-Spam-Score")).toHaveLength(1);
    expect(field(h, "X-Spam-Score")[0]).toMatch(/^-?\d+\.\d\d$/);
    expect(field(h, "X-Spam-Status")[0]).toMatch(/^No, score=-?\d+\.\d\d required=15\.00$/);
    expect(field(h, "X-Spam-Action")).toEqual(["no action"]);
    expect(field(h, "X-Spam-Flag")).toEqual([]);
    // a header rspamd asked to add (milter_headers): it saw our queue id
    expect(field(h, "X-Rspamd-Queue-Id")).toEqual([queueId]);
    // a span around the check, in the message's trace, under its SMTP transaction
    // the transaction's span ends (and is exported) after the check's: wait for both
    const spans = await p.otlp!.waitForSpans((all) => {
      const c = all.find((s) => s.name === "filter.check" && s.attributes["mail.queue_id"] === queueId);
      return c !== undefined && all.some((s) => s.spanId === c.parentSpanId);
    }, 30_000);
    const check = spans.find((s) => s.name === "filter.check" && s.attributes["mail.queue_id"] === queueId)!;
    expect(check.service).toBe("mx");
    expect(check.attributes["mail.filter.action"]).toBe("no action");
    expect(check.attributes["server.port"]).toBe(rspamd.port);
    const root = spans.find((s) => s.spanId === check.parentSpanId);
    expect(root?.name).toBe("smtp.transaction");
    expect(root?.traceId).toBe(check.traceId);
    // the verdict is in the message's timeline
    const { stdout } = await exec(
      "node",
      [join(repoRoot, "packages/mailctl/src/main.ts"), "track", queueId!],
      {
        env: { ...process.env, NATS_URL: p.nats.url },
      },
    );
    expect(stdout).toMatch(
      / mx +filtered +alice@example\.test {2}rspamd: no action {2}score -?\d+\.\d\d\/15\.00/,
    );
    expect(stdout).toMatch(/ mx +queued /);
  });

  it("marks spam it delivers (add header), rewrites the subject, and drops forged X-Spam-* fields", async () => {
    const tag = randomBytes(4).toString("hex");
    await send(
      p.ports.mx,
      message(`marked ${tag}`, `buy now ${RSPAMD_TEST_TRIGGERS.spam}`, [
        "X-Spam-Flag: NO",
        "X-Spam-Status: No, score=-100",
        "X-Spam: No",
      ]),
    );
    // mda files what the filter marked as spam into Junk (the domain's spamToJunk rule, on by default)
    const marked = await arrived(`marked ${tag}`, "Junk");
    expect(field(marked.h, "X-Spam-Flag")).toEqual(["YES"]);
    expect(field(marked.h, "X-Spam-Status")[0]).toMatch(/^Yes, score=\d+\.\d\d required=15\.00$/);
    expect(field(marked.h, "X-Spam-Action")).toEqual(["add header"]);
    // the sender's X-Spam flag is gone (rspamd's remove-spam-flag asks for it too)
    expect(field(marked.h, "X-Spam")).toEqual([]);
    expect(marked.raw.toString()).toContain(`buy now ${RSPAMD_TEST_TRIGGERS.spam}`);

    await send(p.ports.mx, message(`offer ${tag}`, `cheap ${RSPAMD_TEST_TRIGGERS.rewrite}`));
    const rewritten = await arrived(`[SPAM] offer ${tag}`, "Junk");
    expect(field(rewritten.h, "Subject")).toEqual([`[SPAM] offer ${tag}`]);
    expect(field(rewritten.h, "X-Spam-Action")).toEqual(["rewrite subject"]);
  });

  it("answers 451 4.7.1 for greylist and soft reject", async () => {
    const grey = await refusal(p.ports.mx, message("grey", `hm ${RSPAMD_TEST_TRIGGERS.greylist}`));
    expect(grey.code).toBe(451);
    expect(grey.response).toMatch(/^451 4\.7\.1 /);
    const soft = await refusal(p.ports.mx, message("soft", `x ${RSPAMD_TEST_TRIGGERS.softReject}`));
    expect(soft.response).toBe("451 4.7.1 Try again later (test)");
  });

  it("refuses the virus stand-in (a symbol mapped to reject, as antivirus.conf maps CLAM_VIRUS)", async () => {
    const r = await refusal(p.ports.mx, message("attachment", `see attached ${RSPAMD_TEST_TRIGGERS.virus}`));
    expect(r.response).toBe("550 5.7.1 Virus found: MAILPIPE-TEST-VIRUS");
  });

  it("with rspamd stopped: 451 4.7.1, and the client's retry once it is back is accepted and arrives", async () => {
    const subject = `retry ${randomBytes(4).toString("hex")}`;
    const raw = message(subject, "Sent while the filter was down");
    await rspamd.pause();
    try {
      const r = await refusal(p.ports.mx, raw);
      expect(r.code).toBe(451);
      expect(r.response).toMatch(/^451 4\.7\.1 /);
      expect((await p.mailbox("alice@example.test")).some((m) => m.content.includes(subject))).toBe(false);
    } finally {
      await rspamd.start();
    }
    await send(p.ports.mx, raw);
    const { h } = await arrived(subject);
    expect(field(h, "X-Spam-Action")).toEqual(["no action"]);
  }, 180_000);

  it("with a filter slower than RSPAMD_TIMEOUT: 451 4.7.1", async () => {
    // a loopback HTTP server that takes the request and never answers in time
    const held: { end(): void }[] = [];
    const slow: Server = createServer((req, res) => {
      req.resume();
      held.push(res);
    });
    await new Promise<void>((resolve) => slow.listen(0, "127.0.0.1", resolve));
    const mxPort = await freePort();
    const mx = await p.start("mx", "mx-slow", {
      MX_PORT: String(mxPort),
      HTTP_PORT: String(await freePort()),
      RSPAMD_URL: `http://127.0.0.1:${(slow.address() as AddressInfo).port}`,
      RSPAMD_TIMEOUT: "1s",
    });
    try {
      const r = await refusal(mxPort, message("slow", "The filter is slow"));
      expect(r.code).toBe(451);
      expect(r.response).toMatch(/^451 4\.7\.1 /);
      await waitFor(() => mx.logs.some((l) => l.includes('"reason":"timeout"')), {
        timeoutMs: 5_000,
        message: "mx's log of the filter timeout",
      });
    } finally {
      await mx.stop();
      for (const res of held) res.end();
      slow.closeAllConnections();
      await new Promise<void>((resolve) => slow.close(() => resolve()));
    }
  }, 60_000);
});

describe("msa with rspamd", () => {
  async function submit(raw: string) {
    const t = nodemailer.createTransport({
      host: "127.0.0.1",
      port: p.ports.submission,
      secure: false,
      requireTLS: true,
      tls: { rejectUnauthorized: false },
      auth: { user: "alice@example.test", pass: "alice-dev-password" },
    } as TransportOptions);
    try {
      return await t.sendMail({ envelope: { from: "alice@example.test", to: ["bob@example.test"] }, raw });
    } finally {
      t.close();
    }
  }
  const fromAlice = (subject: string, body: string) =>
    message(subject, body).replace("From: Sender <someone@sender.test>", "From: Alice <alice@example.test>");

  it("refuses an authenticated submission rspamd rejects, and leaves a clean one unmarked", async () => {
    const err = await submit(fromAlice("gtube", GTUBE)).then(
      () => undefined,
      (e: { response: string }) => e,
    );
    expect(err?.response).toMatch(/^550 5\.7\.1 /);

    const subject = `submitted ${randomBytes(4).toString("hex")}`;
    await submit(fromAlice(subject, `hello Bob ${RSPAMD_TEST_TRIGGERS.spam}`));
    const copy = await waitFor(
      async () => {
        for (const m of await p.mailbox("bob@example.test"))
          if (m.content.includes(subject)) return m.content;
        return undefined;
      },
      { timeoutMs: 30_000, message: "alice's submission in bob's Maildir" },
    );
    // msa does not change what it DKIM-signed: no scores on mail that leaves
    expect(headersOf(copy).filter((f) => /^X-Spam/i.test(f.name))).toEqual([]);
  });
});
