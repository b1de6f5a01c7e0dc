import { describe, expect, it } from "vitest";
import { rcptDsnArgs, replyFromResponse, xtext } from "./smtp-session.ts";
import { outcomeOf } from "./transaction.ts";

describe("remote replies", () => {
  it("reads code, enhanced code and text, once, from a multi-line reply", () => {
    expect(
      replyFromResponse("550-5.1.1 The email account that you tried to reach\n550 5.1.1 does not exist"),
    ).toEqual({
      code: 550,
      enhanced: "5.1.1",
      text: "The email account that you tried to reach does not exist",
    });
    expect(replyFromResponse("451 Try later")).toEqual({ code: 451, enhanced: "4.0.0", text: "Try later" });
    expect(replyFromResponse("250 2.0.0 Ok: queued as 1234")?.code).toBe(250);
    expect(replyFromResponse("garbage")).toBeUndefined();
    expect(replyFromResponse(undefined)).toBeUndefined();
  });

  it("maps a reply class to an outcome", () => {
    expect(outcomeOf({ code: 250, enhanced: "2.0.0", text: "" })).toBe("delivered");
    expect(outcomeOf({ code: 452, enhanced: "4.2.2", text: "" })).toBe("deferred");
    expect(outcomeOf({ code: 552, enhanced: "5.2.2", text: "" })).toBe("bounced");
  });
});

describe("RFC 3461 parameters passed on", () => {
  it("writes xtext: +, = and octets outside ! to ~ as +HH", () => {
    expect(xtext("env 3+x=y")).toBe("env+203+2Bx+3Dy");
    expect(xtext("plain-id.1")).toBe("plain-id.1");
    expect(xtext("é")).toBe("+C3+A9");
  });

  it("adds each recipient's own NOTIFY and ORCPT to its RCPT line", () => {
    const params = new Map([
      ["a@remote.test", { notify: ["SUCCESS", "FAILURE"] as const, original: "a+b@old.test" }],
      ["b@remote.test", { notify: ["NEVER"] as const }],
      ["c@remote.test", { original: "é@old.test" }],
    ]);
    expect(rcptDsnArgs("RCPT TO:<a@remote.test>", params)).toBe(
      " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb@old.test",
    );
    expect(rcptDsnArgs("RCPT TO:<b@remote.test>", params)).toBe(" NOTIFY=NEVER");
    // rfc822 addresses are ASCII: a non-ASCII original goes without ORCPT
    expect(rcptDsnArgs("RCPT TO:<c@remote.test>", params)).toBe("");
    expect(rcptDsnArgs("RCPT TO:<d@remote.test>", params)).toBe("");
    expect(rcptDsnArgs("RCPT TO:<a@remote.test>", undefined)).toBe("");
  });
});
