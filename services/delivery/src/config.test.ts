import { ConfigError, parseConfig } from "@mailpipe/service-kit";
import { describe, expect, it } from "vitest";
import { config } from "./config.ts";

describe("delivery config", () => {
  it("has the documented defaults", () => {
    const c = parseConfig(config, {});
    expect(c).toMatchObject({
      SMTP_REMOTE_PORT: 25,
      DELIVERY_CONCURRENCY: 100,
      DESTINATION_BUSY_DELAY: 2000,
      SMTP_CONNECT_TIMEOUT: 30_000,
      SMTP_GREETING_TIMEOUT: 300_000,
      SMTP_COMMAND_TIMEOUT: 300_000,
      SMTP_DATA_INIT_TIMEOUT: 120_000,
      SMTP_DATA_BLOCK_TIMEOUT: 180_000,
      SMTP_DATA_DONE_TIMEOUT: 600_000,
      SMTP_TLS_VERIFY: false,
      SMTP_TLS_FALLBACK_PLAIN: true,
      SMTP_REUSE_CONNECTIONS: true,
      SMTP_MAX_MESSAGES_PER_CONNECTION: 100,
      SMTP_IDLE_CONNECTION_TIMEOUT: 30_000,
      DELIVERY_ACK_WAIT: 120_000,
      SMTP_BLOCK_LOCAL_ADDRESSES: true,
      METRICS_MAX_DESTINATIONS: 200,
    });
  });

  it("names every bad variable", () => {
    let err: unknown;
    try {
      parseConfig(config, {
        DELIVERY_CONCURRENCY: "0",
        SMTP_DATA_DONE_TIMEOUT: "0s",
        SMTP_TLS_VERIFY: "maybe",
      });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    const text = (err as Error).message;
    expect(text).toContain("DELIVERY_CONCURRENCY");
    expect(text).toContain("SMTP_DATA_DONE_TIMEOUT");
    expect(text).toContain("SMTP_TLS_VERIFY");
  });
});
