import { describe, expect, it } from "vitest";
import { Directory } from "./directory.ts";
import { isSrsLocal, Srs } from "./srs.ts";

const DAY = 86_400_000;
const now = Date.UTC(2026, 11, 4, 12);
const srs = new Srs({ secrets: ["first-secret-0123456789"] });

const localOf = (a: string) => a.slice(0, a.lastIndexOf("@"));

describe("SRS", () => {
  it("rewrites a sender into SRS0 at our domain, and a bounce to it back", () => {
    const rewritten = srs.forward("alice@sender.test", "example.test", now);
    expect(rewritten).toMatch(/^SRS0=[A-Za-z0-9+/]{4}=[A-Z2-7]{2}=sender\.test=alice@example\.test$/);
    expect(srs.reverse(localOf(rewritten), now)).toEqual({ ok: true, address: "alice@sender.test" });
    // some MTAs change the case of local parts
    expect(srs.reverse(localOf(rewritten).toLowerCase(), now)).toEqual({
      ok: true,
      address: "alice@sender.test",
    });
  });

  it("keeps the null sender and a sender already in the forwarding domain", () => {
    expect(srs.forward("", "example.test", now)).toBe("");
    expect(srs.forward("bob@example.test", "example.test", now)).toBe("bob@example.test");
  });

  it("wraps another forwarder's SRS0 into SRS1 that points back at it", () => {
    const other = new Srs({ secrets: ["other-forwarder-secret-99"] });
    const first = other.forward("alice@sender.test", "fwd.test", now);
    const second = srs.forward(first, "example.test", now);
    expect(second).toMatch(
      /^SRS1=[A-Za-z0-9+/]{4}=fwd\.test==[A-Za-z0-9+/]{4}=[A-Z2-7]{2}=sender\.test=alice@example\.test$/,
    );
    // a bounce to it goes to the first forwarder's address, which that forwarder checks
    const back = srs.reverse(localOf(second), now);
    expect(back).toEqual({ ok: true, address: first });
    expect(other.reverse(localOf(first), now)).toEqual({ ok: true, address: "alice@sender.test" });
    // forwarded once more: still one SRS1 hop back to fwd.test
    const third = new Srs({ secrets: ["third-secret-abcdefghij"] }).forward(second, "third.test", now);
    expect(third).toMatch(/^SRS1=[^=]{4}=fwd\.test==/);
    expect(third.endsWith("@third.test")).toBe(true);
  });

  it("refuses a forged hash and an address past its age", () => {
    const rewritten = localOf(srs.forward("alice@sender.test", "example.test", now));
    const forged = rewritten.replace(/^SRS0=[^=]{4}=/, "SRS0=AAAA=");
    expect(srs.reverse(forged, now)).toEqual({ ok: false, reason: "forged" });
    // someone else's secret
    const theirs = localOf(
      new Srs({ secrets: ["not-our-secret-0000000"] }).forward("x@y.test", "example.test", now),
    );
    expect(srs.reverse(theirs, now)).toEqual({ ok: false, reason: "forged" });
    expect(srs.reverse(rewritten, now + 21 * DAY)).toMatchObject({ ok: true });
    expect(srs.reverse(rewritten, now + 22 * DAY)).toEqual({ ok: false, reason: "expired" });
    expect(srs.reverse("SRS0=bad", now)).toEqual({ ok: false, reason: "malformed" });
  });

  it("accepts addresses made with an older secret after a rotation", () => {
    const old = new Srs({ secrets: ["old-secret-0123456789ab"] });
    const made = localOf(old.forward("alice@sender.test", "example.test", now));
    const rotated = new Srs({ secrets: ["new-secret-0123456789ab", "old-secret-0123456789ab"] });
    expect(rotated.reverse(made, now)).toEqual({ ok: true, address: "alice@sender.test" });
    expect(rotated.forward("alice@sender.test", "example.test", now)).not.toBe(`${made}@example.test`);
  });

  it("knows an SRS local part", () => {
    expect(isSrsLocal("SRS0=abcd=AB=x.test=y")).toBe(true);
    expect(isSrsLocal("srs1+abcd=x.test==y")).toBe(true);
    expect(isSrsLocal("srs")).toBe(false);
    expect(isSrsLocal("alice")).toBe(false);
  });
});

describe("SRS in the directory", () => {
  const yaml = (srsSection: string) => `domains:
  example.test: {}
users:
  alice@example.test: {}
aliases:
  fwd@example.test: [friend@remote.test]
${srsSection}`;

  it("accepts a bounce to a rewritten sender and resolves it to the original sender", () => {
    const dir = Directory.fromYaml(yaml("srs:\n  secrets: [first-secret-0123456789]\n"));
    const rewritten = dir.srs()!.forward("alice@sender.test", "example.test");
    expect(dir.acceptsRecipient(rewritten)).toBe("ok");
    expect(dir.resolve(rewritten)).toMatchObject({ remote: ["alice@sender.test"], local: [], unknown: [] });
    const forged = rewritten.replace(/^SRS0=[^=]{4}=/, "SRS0=AAAA=");
    expect(dir.acceptsRecipient(forged)).toBe("srs-invalid");
    expect(dir.srsReverse(forged)).toEqual({ ok: false, reason: "forged" });
    expect(dir.resolve(forged)).toMatchObject({ remote: [], unknown: [forged] });
    // ordinary addresses are untouched
    expect(dir.acceptsRecipient("nobody@example.test")).toBe("unknown-user");
    expect(dir.srsReverse("alice@example.test")).toBeUndefined();
  });

  it("refuses SRS addresses when no SRS is configured", () => {
    const dir = Directory.fromYaml(yaml(""));
    expect(dir.srs()).toBeUndefined();
    const made = new Srs({ secrets: ["first-secret-0123456789"] }).forward("a@b.test", "example.test");
    expect(dir.acceptsRecipient(made)).toBe("srs-invalid");
  });

  it("says what is wrong with an SRS section", () => {
    expect(() => Directory.fromYaml(yaml("srs:\n  secrets: [short]\n"))).toThrow(/at least 16 characters/);
    expect(() => Directory.fromYaml(yaml("srs: {maxAgeDays: 3}\n"))).toThrow(
      /exactly one of secrets or secretFile/,
    );
    expect(() => Directory.fromYaml(yaml("srs:\n  secretFile: /nonexistent/srs.secret\n"))).toThrow(
      /cannot read \/nonexistent\/srs.secret/,
    );
  });
});
