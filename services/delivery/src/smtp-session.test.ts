import { describe, expect, it } from "vitest";
import { replyFromResponse } from "./smtp-session.ts";
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
