import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { createTelemetry } from "@mailpipe/telemetry";
import { tempDir } from "@mailpipe/testing";
import { describe, expect, it } from "vitest";
import type { Dane } from "./dane.ts";
import type { MtaSts, StsPolicy } from "./mta-sts.ts";
import { createOutboundTls } from "./outbound-tls.ts";
import { tlsPolicySetting } from "./tls-policy.ts";

const log = createTelemetry({ service: "delivery", logLevel: "silent" }).log;
const policy: StsPolicy = {
  domain: "both.test",
  id: "1",
  mode: "enforce",
  mx: ["*.both.test"],
  maxAge: 3600,
  fetchedAt: "",
  expiresAt: "",
  text: "version: STSv1\nmode: enforce\nmx: *.both.test\nmax_age: 3600\n",
};
const mtaSts = { lookup: async () => ({ policy }) } as unknown as MtaSts;
const tlsa = [{ usage: 3, selector: 1, matchingType: 1, data: Buffer.alloc(32, 7) }];
const dane = {
  lookup: async (mx: string) => ({ records: mx === "dane.both.test" ? tlsa : [] }),
} as unknown as Dane;

async function decide(rules: string, exchange: string) {
  const tls = createOutboundTls({
    rules: tlsPolicySetting().parse(rules),
    verifyByDefault: false,
    mtaSts,
    dane,
    log,
  });
  const chosen = await (await tls.forDestination("both.test")).forHost(exchange);
  return "decision" in chosen ? chosen.decision : { failure: chosen.failure.reply };
}

describe("choosing the TLS policy of an MX host", () => {
  it("takes TLS_POLICY first, then DANE, then MTA-STS", async () => {
    expect(await decide("", "dane.both.test")).toMatchObject({ level: "dane", source: "dane", tlsa });
    expect(await decide("", "mx.both.test")).toMatchObject({ level: "verify", source: "mta-sts" });
    expect(await decide("", "mx.elsewhere.test")).toEqual({
      failure: expect.objectContaining({ code: 451, enhanced: "4.7.5" }),
    });
    expect(await decide("both.test: required", "dane.both.test")).toMatchObject({
      level: "required",
      source: "config",
      label: "required, TLS_POLICY both.test",
    });
    expect(await decide('"mx:*.both.test": opportunistic', "mx.both.test")).toMatchObject({
      level: "opportunistic",
      source: "config",
    });
  });

  it("matches the longest MX pattern, and a domain rule before an MX rule", async () => {
    const rules =
      '{"mx:*.both.test": "required", "mx:*.dane.both.test": "verify", "mx:exact.both.test": "opportunistic"}';
    expect(await decide(rules, "a.dane.both.test")).toMatchObject({
      level: "verify",
      label: "verify, TLS_POLICY mx:*.dane.both.test",
    });
    expect(await decide(rules, "b.both.test")).toMatchObject({ level: "required" });
    expect(await decide(rules, "exact.both.test")).toMatchObject({ level: "opportunistic" });
  });
});

describe("OUTBOUND_TLS_CA_FILE", () => {
  it("names the file and what is wrong with it", async () => {
    const { trustedCas } = await import("./worker.ts");
    expect(trustedCas("")).toBeUndefined();
    expect(() => trustedCas("/nonexistent/ca.pem")).toThrow(
      /OUTBOUND_TLS_CA_FILE: cannot read \/nonexistent\/ca\.pem \(ENOENT\)/,
    );
    const dir = await tempDir("ca-file");
    try {
      const file = join(dir.path, "not-a-ca.pem");
      await writeFile(file, "hello\n");
      expect(() => trustedCas(file)).toThrow(/holds no PEM certificate/);
    } finally {
      await dir.remove();
    }
  });
});
