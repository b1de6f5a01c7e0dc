import { Directory } from "@mailpipe/directory";
import { describe, expect, it } from "vitest";
import { submissionFixups } from "./fixups.ts";
import { checkEnvelopeSender, checkHeaderFrom, fromAddresses } from "./sender-policy.ts";

const dir = Directory.fromYaml(`
domains:
  example.test:
  example.org:
users:
  alice@example.test:
    sendAs: [alice.smith@example.test, "@example.org"]
  bob@example.test: {}
aliases:
  team@example.test: [alice@example.test, bob@example.test]
  other@example.test: [bob@example.test]
`);

describe("envelope sender", () => {
  it("accepts the user's own address, its +tags, sendAs entries and aliases reaching the user", () => {
    for (const a of [
      "alice@example.test",
      "Alice@Example.TEST",
      "alice+news@example.test",
      "alice.smith@example.test",
      "anyone@example.org",
      "team@example.test",
    ]) {
      expect(checkEnvelopeSender(dir, "alice@example.test", a), a).toBeUndefined();
    }
  });

  it("refuses another user's address, an alias that does not reach the user, and outside domains", () => {
    for (const a of ["bob@example.test", "other@example.test", "alice@elsewhere.test"]) {
      expect(checkEnvelopeSender(dir, "alice@example.test", a), a).toEqual({
        code: 553,
        enhanced: "5.7.1",
        text: `Sender address <${a}> is not owned by you`,
      });
    }
  });

  it("refuses the null sender", () => {
    expect(checkEnvelopeSender(dir, "alice@example.test", "")).toMatchObject({
      code: 553,
      enhanced: "5.7.1",
    });
  });
});

describe("header From", () => {
  it("parses display names, groups and several mailboxes", () => {
    expect(fromAddresses('"Smith, Alice" <alice@example.test>, team: bob@example.test, x@y.test;')).toEqual([
      "alice@example.test",
      "bob@example.test",
      "x@y.test",
    ]);
  });

  it("accepts owned addresses and names the author domain", () => {
    expect(checkHeaderFrom(dir, "alice@example.test", ["Alice <alice@example.test>"])).toEqual({
      ok: true,
      addresses: ["alice@example.test"],
      domain: "example.test",
    });
    expect(checkHeaderFrom(dir, "alice@example.test", ["news@Example.ORG"])).toMatchObject({
      ok: true,
      domain: "example.org",
    });
  });

  it("refuses a spoofed From, even as the second mailbox", () => {
    expect(
      checkHeaderFrom(dir, "alice@example.test", ["alice@example.test, Bob <bob@example.test>"]),
    ).toEqual({
      ok: false,
      reply: { code: 553, enhanced: "5.7.1", text: "Sender address <bob@example.test> is not owned by you" },
    });
  });

  it("refuses a message without From, with two From fields, or with no address in it", () => {
    const code = (values: string[]) => {
      const r = checkHeaderFrom(dir, "alice@example.test", values);
      return r.ok ? "ok" : `${r.reply.code} ${r.reply.enhanced}`;
    };
    expect(code([])).toBe("550 5.6.0");
    expect(code(["alice@example.test", "alice@example.test"])).toBe("550 5.6.0");
    expect(code(["undisclosed-recipients:;"])).toBe("550 5.6.0");
    expect(code(["Alice"])).toBe("550 5.6.0");
    expect(code(["Alice <alice@example.test.evil.test>"])).toBe("553 5.7.1");
  });
});

describe("submission fix-ups", () => {
  const header = (fields: Record<string, string>) => (name: string) =>
    Object.entries(fields)
      .filter(([k]) => k.toLowerCase() === name.toLowerCase())
      .map(([, v]) => v);

  it("adds Message-ID and Date when missing", () => {
    const f = submissionFixups({
      header: header({ From: "a@example.test" }),
      queueId: "01JQ0000000000000000000000",
      hostname: "mail.example.test",
      date: new Date("2025-01-02T03:04:05Z"),
    });
    expect(f.fields).toBe(
      "Message-ID: <01JQ0000000000000000000000@mail.example.test>\r\nDate: Thu, 02 Jan 2025 03:04:05 +0000\r\n",
    );
    expect(f.messageId).toBe("<01JQ0000000000000000000000@mail.example.test>");
    expect(f.added).toEqual(["Message-ID", "Date"]);
  });

  it("keeps the client's own", () => {
    const f = submissionFixups({
      header: header({ "Message-Id": "<abc@client>", date: "Mon, 1 Jan 2024 00:00:00 +0000" }),
      queueId: "01JQ0000000000000000000000",
      hostname: "mail.example.test",
    });
    expect(f).toEqual({ fields: "", messageId: "<abc@client>", added: [] });
  });
});
