import { ConfigError, parseConfig } from "@mailpipe/service-kit";
import { describe, expect, it } from "vitest";
import { config } from "./config.ts";
import { parseRate, policyFor } from "./destination-limits.ts";

const limits = (yaml: string) => parseConfig(config, { DESTINATION_LIMITS: yaml }).DESTINATION_LIMITS;

describe("destination limits", () => {
  it("has defaults: 20 transactions at once per site, no rate, overrides empty", () => {
    const c = parseConfig(config, {});
    expect(c.DESTINATION_CONNECTIONS).toBe(20);
    expect(c.DESTINATION_RATE).toBeNull();
    expect(c.DESTINATION_SLOT_LEASE).toBe(60_000);
    expect(
      policyFor(c.DESTINATION_LIMITS, { connections: 20, rate: null }, "gmail.com", ["mx.gmail.com"]),
    ).toEqual({ connections: 20, priority: 0 });
  });

  it("reads rates per second, minute, hour and day, and 0 or none for no limit", () => {
    expect(parseRate("300/min")).toEqual({ messages: 300, perMs: 60_000 });
    expect(parseRate("10 / s")).toEqual({ messages: 10, perMs: 1000 });
    expect(parseRate("1000/hour")).toEqual({ messages: 1000, perMs: 3_600_000 });
    expect(parseRate("5000/d")).toEqual({ messages: 5000, perMs: 86_400_000 });
    expect(parseRate("0")).toBeNull();
    expect(parseRate("none")).toBeNull();
    expect(parseRate("300 per minute")).toBeUndefined();
    expect(parseRate("300/fortnight")).toBeUndefined();
  });

  it("applies a domain rule, then the most specific MX host rule, then the defaults, field by field", () => {
    const l = limits(`
gmail.com: { connections: 20, rate: 300/min }
googlemail.com: { rate: 0 }
"mx:*.google.com": { connections: 10, rate: 100/min }
"mx:*.l.google.com": { connections: 15 }
"mx:mx.exact.net": { connections: 2 }
`);
    const defaults = { connections: 5, rate: { messages: 60, perMs: 60_000 } };
    const gmailHosts = ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"];
    expect(policyFor(l, defaults, "gmail.com", gmailHosts)).toEqual({
      connections: 20,
      rate: { messages: 300, perMs: 60_000 },
      priority: 2,
    });
    // a domain rule without connections takes them from the MX rule; rate 0 lifts the default rate
    expect(policyFor(l, defaults, "googlemail.com", gmailHosts)).toEqual({ connections: 15, priority: 2 });
    // the longest matching suffix wins over a shorter one; the rate comes from the default
    expect(policyFor(l, defaults, "example.org", ["aspmx.l.google.com"])).toEqual({
      connections: 15,
      rate: { messages: 60, perMs: 60_000 },
      priority: 1,
    });
    expect(policyFor(l, defaults, "example.org", ["smtp.google.com"])).toMatchObject({
      connections: 10,
      rate: { messages: 100, perMs: 60_000 },
    });
    expect(policyFor(l, defaults, "Example.NET.", ["MX.Exact.Net."])).toMatchObject({
      connections: 2,
      priority: 1,
    });
    expect(policyFor(l, defaults, "other.org", ["mx.other.org"])).toEqual({ ...defaults, priority: 0 });
  });

  it("takes JSON as well as YAML", () => {
    const l = limits('{"gmail.com": {"connections": 7}}');
    expect(l.domains.get("gmail.com")).toEqual({ connections: 7 });
  });

  it("refuses a bad entry at start, naming it and saying what is wrong", () => {
    let message = "";
    try {
      parseConfig(config, {
        DESTINATION_LIMITS: `
gmail.com: { connections: 0 }
yahoo.com: { rate: 300/minute-ish }
outlook.com: { connection: 5 }
"not a domain": { connections: 1 }
"mx:*.": { connections: 1 }
hotmail.com: 12
`,
        DESTINATION_RATE: "fast",
        DESTINATION_SLOT_LEASE: "10ms",
      });
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      message = (err as Error).message;
    }
    expect(message).toContain('DESTINATION_LIMITS: entry "gmail.com": connections must be a whole number');
    expect(message).toContain('entry "yahoo.com": rate "300/minute-ish"');
    expect(message).toContain('entry "outlook.com": unknown field "connection"');
    expect(message).toContain('entry "not a domain": not a domain name');
    expect(message).toContain('entry "mx:*.": not an MX host name or pattern');
    expect(message).toContain('entry "hotmail.com": must be a map');
    expect(message).toContain('DESTINATION_RATE: "fast" is not a rate');
    expect(message).toContain("DESTINATION_SLOT_LEASE");
    expect(() => parseConfig(config, { DESTINATION_LIMITS: "[1, 2]" })).toThrow(
      /must be a map of destinations/,
    );
    expect(() => parseConfig(config, { DESTINATION_LIMITS: "a: [" })).toThrow(/not YAML or JSON/);
  });
});
