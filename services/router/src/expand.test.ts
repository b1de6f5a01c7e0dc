import { Directory } from "@mailpipe/directory";
import { describe, expect, it } from "vitest";
import { DIRECTORY_YAML } from "../test/harness.ts";
import { expandRecipients } from "./expand.ts";

const dir = Directory.fromYaml(DIRECTORY_YAML);
const now = Date.parse("2025-03-04T09:00:00Z");

describe("recipient expansion", () => {
  it("delivers one copy per mailbox and one request entry per remote address", () => {
    const out = expandRecipients(
      dir,
      [
        { address: "team@example.test" },
        { address: "dave@example.test" },
        { address: "fwd@example.test" },
        { address: "friend@remote.test" },
        { address: "Friend@Remote.TEST" },
      ],
      { plusSeparator: "+", now },
    );
    expect(out.map((r) => r.rid)).toEqual([
      "l:dave@example.test",
      "l:erin@example.test",
      "r:friend@remote.test",
      "r:Friend@remote.test",
    ]);
    expect(out[0]).toMatchObject({
      kind: "local",
      original: "team@example.test",
      state: "pending",
      attempt: 1,
    });
    expect(out[2]).toMatchObject({ kind: "remote", domain: "remote.test", original: "fwd@example.test" });
  });

  it("honours NOTIFY and bounces unknown users and loops before any attempt", () => {
    const out = expandRecipients(
      dir,
      [
        { address: "alice@example.test", notify: ["NEVER"] },
        { address: "bob@example.test", notify: ["FAILURE"] },
        { address: "ghost@example.test" },
        { address: "loop2@example.test" },
      ],
      { plusSeparator: "+", now },
    );
    expect(out[0]).toMatchObject({ notifyFailure: false, notifyDelay: false });
    expect(out[1]).toMatchObject({ notifyFailure: true, notifyDelay: false });
    expect(out[2]).toMatchObject({
      rid: "u:ghost@example.test",
      kind: "none",
      state: "bounced",
      lastReply: { code: 550, enhanced: "5.1.1" },
      lastAttemptAt: "2025-03-04T09:00:00.000Z",
    });
    expect(out[3]).toMatchObject({
      rid: "u:loop2@example.test",
      lastReply: { code: 554, enhanced: "5.4.6" },
    });
    expect(out).toHaveLength(4);
  });

  it("turns plus-addressing off with an empty separator", () => {
    const [r] = expandRecipients(dir, [{ address: "carol+work@example.test" }], { plusSeparator: "", now });
    expect(r).toMatchObject({ state: "bounced", lastReply: { enhanced: "5.1.1" } });
  });
});
