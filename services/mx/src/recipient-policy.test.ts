import { Directory } from "@mailpipe/directory";
import { describe, expect, it } from "vitest";
import { DIRECTORY } from "../test/harness.ts";
import { checkRecipient } from "./recipient-policy.ts";

const dir = Directory.fromYaml(DIRECTORY);
const verdict = (a: string) => {
  const v = checkRecipient(dir, a);
  return v.ok ? `ok ${v.address}` : `${v.reply.code} ${v.reply.enhanced}`;
};

describe("recipient policy", () => {
  it("accepts users, aliases and plus-addresses of our domains, normalising the domain", () => {
    expect(verdict("alice@example.test")).toBe("ok alice@example.test");
    expect(verdict("Alice@EXAMPLE.test")).toBe("ok Alice@example.test");
    expect(verdict("team@example.test")).toBe("ok team@example.test");
    expect(verdict("alice+news@example.test")).toBe("ok alice+news@example.test");
    expect(verdict("carol@strict.test")).toBe("ok carol@strict.test");
  });

  it("refuses unknown local users with 550 5.1.1", () => {
    expect(verdict("nobody@example.test")).toBe("550 5.1.1");
    expect(checkRecipient(dir, "nobody@example.test")).toMatchObject({
      reply: { text: "<nobody@example.test>: no such user here" },
    });
  });

  it("refuses other domains and every relay trick with 550 5.7.1", () => {
    for (const a of [
      "bob@other.test",
      "user%other.test@example.test",
      "user!other.test@example.test",
      "other.test!user@example.test",
      '"user@other.test"@example.test',
      '"user%other.test"@example.test',
      "user@[127.0.0.1]",
      "alice@[IPv6:::1]",
      "alice@example.test.other.test",
    ]) {
      expect(verdict(a), a).toBe("550 5.7.1");
    }
  });

  it("maps a domainless postmaster to postmaster@ our first domain", () => {
    expect(verdict("postmaster")).toBe("ok postmaster@example.test");
    expect(verdict("PostMaster")).toBe("ok postmaster@example.test");
    const bare = Directory.fromYaml("domains:\n  example.test:\nusers:\n  alice@example.test: {}\n");
    expect(checkRecipient(bare, "postmaster")).toMatchObject({
      ok: false,
      reply: { code: 550, enhanced: "5.1.1" },
    });
  });

  it("answers addresses that are not mailboxes with 501 5.1.3", () => {
    expect(verdict("no-at-sign")).toBe("501 5.1.3");
    expect(verdict("alice@exa_mple.test")).toBe("501 5.1.3");
    expect(verdict("a(b)c@example.test")).toBe("501 5.1.3");
  });
});
