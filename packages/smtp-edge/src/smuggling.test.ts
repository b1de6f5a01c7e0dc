import { type NatsHandle, startNats, waitFor } from "@mailpipe/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type EdgeHarness, openData, startEdge } from "../test/harness.ts";

// SMTP smuggling (CVE-2023-51764/5/6): a client ends DATA with a bare-LF or bare-CR lookalike of
// <CRLF>.<CRLF> and hopes a server treats it as the end, so the "smuggled" MAIL/RCPT/DATA after it
// become a second message (with a forged sender) on the next hop.

let nats: NatsHandle;
let h: EdgeHarness;

beforeAll(async () => {
  nats = await startNats();
  h = await startEdge(nats.url);
});
afterAll(async () => {
  await h?.close();
  await nats?.stop();
});

const SMUGGLED =
  "MAIL FROM:<ceo@victim.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nFrom: ceo@victim.test\r\n\r\nsmuggled\r\n";

describe("end-of-data lookalikes", () => {
  it.each([
    ["\\n.\\n", "\n.\n"],
    ["\\r.\\r", "\r.\r"],
    ["\\n.\\r\\n", "\n.\r\n"],
    ["\\r\\n.\\n", "\r\n.\n"],
    ["\\r\\n.\\r", "\r\n.\r"],
  ])("%s never ends the message early nor makes two of one", async (_name, fake) => {
    const before = h.seen.length;
    const c = await h.connect();
    await openData(c, "sender@remote.test", ["alice@example.test"]);
    c.write(`Subject: smuggling test\r\n\r\nfirst line${fake}${SMUGGLED}.\r\n`);
    const reply = await c.read();
    expect(reply.code).toBe(250);
    expect(reply.enhanced).toBe("2.0.0");
    const queueId = /queued as (\S+)/.exec(reply.text)?.[1];
    expect(queueId).toBeDefined();
    // had the lookalike ended DATA, the smuggled commands would have their own replies by now
    await expect(c.read(400)).rejects.toThrow(/no SMTP reply/);
    expect((await c.command("QUIT")).code).toBe(221);
    c.close();

    expect(h.seen.length).toBe(before + 1);
    const { tx, message } = h.seen[before]!;
    expect(tx.mailFrom).toBe("sender@remote.test");
    expect(tx.recipients).toEqual(["alice@example.test"]);
    const body = Buffer.concat(message.chunks).toString("latin1");
    expect(body).toContain("MAIL FROM:<ceo@victim.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n");
    // normalised: no bare CR or LF survives into what is stored
    expect(body.replace(/\r\n/g, "")).not.toMatch(/[\r\n]/);

    const published = await waitFor(() => h.queued.find((q) => q.queueId === queueId), {
      timeoutMs: 5000,
      message: "queued message",
    });
    expect(published.envelope.rcptTo).toEqual([{ address: "alice@example.test" }]);
    const stored = (await h.body(published)).toString("latin1");
    expect(stored.endsWith(body)).toBe(true);
    expect(stored).toContain("MAIL FROM:<ceo@victim.test>");
    expect(h.queued.filter((q) => q.envelope.mailFrom === "ceo@victim.test")).toEqual([]);
  });

  it("sees exactly one transaction span per smuggling attempt", async () => {
    const c = await h.connect();
    h.spans.reset();
    await openData(c);
    c.write(`Subject: s\r\n\r\nx\n.\n${SMUGGLED}.\r\n`);
    expect((await c.read()).code).toBe(250);
    await c.command("QUIT");
    c.close();
    await waitFor(() => h.spans.getFinishedSpans().some((s) => s.name === "smtp.session"), {
      timeoutMs: 3000,
    });
    expect(h.spans.getFinishedSpans().filter((s) => s.name === "smtp.transaction")).toHaveLength(1);
    expect(h.spans.getFinishedSpans().filter((s) => s.name === "smtp.mail")).toHaveLength(1);
  });
});
