import { ConfigError, parseConfig } from "@mailpipe/service-kit";
import { describe, expect, it } from "vitest";
import { msaConfig } from "./config.ts";

const tls = { TLS_CERT_FILE: "/tls/tls.crt", TLS_KEY_FILE: "/tls/tls.key" };

describe("msa config", () => {
  it("has the documented defaults", () => {
    const c = parseConfig(msaConfig, tls);
    expect(c).toMatchObject({
      MSA_HOST: "0.0.0.0",
      MSA_SUBMISSION_PORT: 587,
      MSA_SUBMISSIONS_PORT: 465,
      DIRECTORY_FILE: "/etc/mailpipe/directory.yaml",
      MAX_MESSAGE_SIZE: 25 * 1024 * 1024,
      MAX_CONNECTIONS: 1000,
      MAX_CONNECTIONS_PER_IP: 20,
      SMTP_IDLE_TIMEOUT: 300_000,
      SMTP_DATA_TIMEOUT: 600_000,
      SMTP_SESSION_TIMEOUT: 1_800_000,
      SMTP_ACCEPT_TIMEOUT: 30_000,
      MAX_RECEIVED_HEADERS: 50,
      MSA_PROXY_PROTOCOL: false,
      AUTH_FAIL_WINDOW: 900_000,
      AUTH_FAIL_SLOWDOWN_AFTER: 3,
      AUTH_FAIL_DELAY_STEP: 1000,
      AUTH_FAIL_DELAY_MAX: 5000,
      AUTH_FAIL_LIMIT_IP: 10,
      AUTH_FAIL_LIMIT_USER: 5,
      AUTH_LOCKOUT: 900_000,
      AUTH_LOCKED_CLOSE_AFTER: 3,
      RATE_MESSAGES_PER_HOUR: 200,
      RATE_RECIPIENTS_PER_MESSAGE: 100,
      MSA_RECEIVED_CLIENT_DETAILS: false,
      MSA_RECEIVED_AUTH_USER: false,
    });
  });

  it("fails fast, naming both variables, without a TLS certificate and key", () => {
    expect(() => parseConfig(msaConfig, {})).toThrow(ConfigError);
    try {
      parseConfig(msaConfig, { TLS_CERT_FILE: " " });
    } catch (err) {
      expect((err as Error).message).toMatch(/TLS_CERT_FILE: required: msa accepts logins only over TLS/);
      expect((err as Error).message).toMatch(/TLS_KEY_FILE: required/);
    }
  });

  it("refuses values it cannot honour", () => {
    expect(() => parseConfig(msaConfig, { ...tls, RATE_RECIPIENTS_PER_MESSAGE: "0" })).toThrow(
      /RATE_RECIPIENTS_PER_MESSAGE/,
    );
    expect(() => parseConfig(msaConfig, { ...tls, AUTH_LOCKOUT: "soon" })).toThrow(/AUTH_LOCKOUT/);
    expect(() => parseConfig(msaConfig, { ...tls, MSA_RECEIVED_AUTH_USER: "perhaps" })).toThrow(
      /MSA_RECEIVED_AUTH_USER/,
    );
    expect(parseConfig(msaConfig, { ...tls, MSA_RECEIVED_AUTH_USER: "true" }).MSA_RECEIVED_AUTH_USER).toBe(
      true,
    );
  });
});
