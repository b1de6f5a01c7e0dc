import { ConfigError, parseConfig } from "@mailpipe/service-kit";
import { describe, expect, it } from "vitest";
import { mxConfig } from "./config.ts";

describe("mx config", () => {
  it("has the documented defaults", () => {
    const c = parseConfig(mxConfig, {});
    expect(c).toMatchObject({
      MX_HOST: "0.0.0.0",
      MX_PORT: 25,
      MAX_MESSAGE_SIZE: 25 * 1024 * 1024,
      MAX_RECIPIENTS: 100,
      MAX_CONNECTIONS: 1000,
      MAX_CONNECTIONS_PER_IP: 20,
      SMTP_IDLE_TIMEOUT: 300_000,
      SMTP_DATA_TIMEOUT: 600_000,
      SMTP_SESSION_TIMEOUT: 1_800_000,
      SMTP_ACCEPT_TIMEOUT: 30_000,
      MAX_RECEIVED_HEADERS: 50,
      MX_PROXY_PROTOCOL: false,
      DIRECTORY_FILE: "/etc/mailpipe/directory.yaml",
      DNS_SERVERS: [],
      TLS_RELOAD_INTERVAL: 5000,
    });
    expect(c.TLS_CERT_FILE).toBeUndefined();
    expect(c.TLS_KEY_FILE).toBeUndefined();
  });

  it("parses sizes, durations, lists and booleans", () => {
    const c = parseConfig(mxConfig, {
      MAX_MESSAGE_SIZE: "10M",
      SMTP_DATA_TIMEOUT: "90s",
      DNS_SERVERS: "127.0.0.1:5353, 10.0.0.2",
      MX_PROXY_PROTOCOL: "true",
    });
    expect(c.MAX_MESSAGE_SIZE).toBe(10 * 1024 * 1024);
    expect(c.SMTP_DATA_TIMEOUT).toBe(90_000);
    expect(c.DNS_SERVERS).toEqual(["127.0.0.1:5353", "10.0.0.2"]);
    expect(c.MX_PROXY_PROTOCOL).toBe(true);
  });

  it("fails fast, naming the variable, on bad values and on half a TLS pair", () => {
    expect(() => parseConfig(mxConfig, { MAX_RECIPIENTS: "0" })).toThrow(/MAX_RECIPIENTS/);
    expect(() => parseConfig(mxConfig, { DNS_SERVERS: "not a server!" })).toThrow(/DNS_SERVERS/);
    expect(() => parseConfig(mxConfig, { TLS_CERT_FILE: "/x/cert.pem" })).toThrow(ConfigError);
    expect(() => parseConfig(mxConfig, { TLS_CERT_FILE: "/x/cert.pem" })).toThrow(/TLS_KEY_FILE/);
  });
});
