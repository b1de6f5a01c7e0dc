import { describe, expect, it } from "vitest";
import {
  type AuthOutcome,
  authenticationResultsField,
  dmarcDecision,
  transactionResolver,
} from "./mail-auth.ts";

const outcome = (o: Partial<AuthOutcome>): AuthOutcome => ({
  header: "",
  spf: "fail",
  dkim: [],
  dmarc: "fail",
  arc: "none",
  dmarcPolicy: { domain: "reject.test", policy: "reject", result: "fail" },
  temporary: false,
  ...o,
});

describe("DMARC decision", () => {
  it("refuses a failure under p=reject with 550 5.7.1", () => {
    expect(dmarcDecision(outcome({}))).toMatchObject({ code: 550, enhanced: "5.7.1" });
  });

  it("defers instead when a DNS temperror may be why it failed", () => {
    expect(dmarcDecision(outcome({ temporary: true }))).toMatchObject({ code: 451, enhanced: "4.4.3" });
  });

  it("lets everything else through", () => {
    expect(dmarcDecision(outcome({ dmarcPolicy: undefined }))).toBeUndefined();
    expect(
      dmarcDecision(outcome({ dmarcPolicy: { domain: "a.test", policy: "none", result: "fail" } })),
    ).toBeUndefined();
    expect(
      dmarcDecision(outcome({ dmarcPolicy: { domain: "a.test", policy: "quarantine", result: "fail" } })),
    ).toBeUndefined();
    expect(
      dmarcDecision(outcome({ dmarcPolicy: { domain: "a.test", policy: "reject", result: "pass" } })),
    ).toBeUndefined();
    expect(
      dmarcDecision(outcome({ dmarcPolicy: { domain: "a.test", policy: "reject", result: "temperror" } })),
    ).toBeUndefined();
  });
});

describe("Authentication-Results field", () => {
  it("is taken from mailauth's headers without Received-SPF", () => {
    const headers =
      "Received-SPF: pass (mx.test: domain of a@b.test designates 127.0.0.1 as permitted sender)\r\n client-ip=127.0.0.1;\r\n" +
      "Authentication-Results: mx.test;\r\n spf=pass smtp.mailfrom=b.test;\r\n dmarc=pass header.from=b.test\r\n";
    expect(authenticationResultsField(headers)).toBe(
      "Authentication-Results: mx.test;\r\n spf=pass smtp.mailfrom=b.test;\r\n dmarc=pass header.from=b.test\r\n",
    );
  });

  it("is not fooled by a sender address that spells the field name", () => {
    const headers =
      'Received-SPF: fail envelope-from="Authentication-Results:x"@b.test;\r\n' +
      "Authentication-Results: mx.test; spf=fail\r\n";
    expect(authenticationResultsField(headers)).toBe("Authentication-Results: mx.test; spf=fail\r\n");
  });
});

describe("per-transaction resolver", () => {
  it("asks each name and type once, failures included", async () => {
    let calls = 0;
    const resolve = transactionResolver(async (name) => {
      calls++;
      if (name === "fail.test")
        throw Object.assign(new Error("queryTxt ESERVFAIL fail.test"), { code: "ESERVFAIL" });
      return [["v=spf1 -all"]];
    });
    await resolve("a.test", "TXT");
    await resolve("A.TEST", "txt");
    await expect(resolve("fail.test", "TXT")).rejects.toThrow(/ESERVFAIL/);
    await expect(resolve("fail.test", "TXT")).rejects.toThrow(/ESERVFAIL/);
    expect(calls).toBe(2);
  });
});
