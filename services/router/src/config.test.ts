import { ConfigError, parseConfig } from "@mailpipe/service-kit";
import { describe, expect, it } from "vitest";
import { config } from "./config.ts";

describe("router config", () => {
  it("has the documented defaults", () => {
    const c = parseConfig(config, {});
    expect(c).toMatchObject({
      DIRECTORY_FILE: "/etc/mailpipe/directory.yaml",
      DNS_SERVERS: [],
      RETRY_SCHEDULE: [60_000, 300_000, 900_000, 1_800_000, 3_600_000, 7_200_000, 14_400_000],
      RETRY_JITTER: 0.1,
      QUEUE_LIFETIME: 5 * 86_400_000,
      DELAY_WARNING: 4 * 3_600_000,
      ROUTER_CONCURRENCY: 64,
      SCHEDULER_INTERVAL: 1000,
      SCHEDULER_BATCH: 500,
      SCHEDULER_LEASE: 60_000,
      STALE_DISPATCH: 3_600_000,
      DSN_BATCH_DELAY: 2000,
      PLUS_SEPARATOR: "+",
    });
    expect(
      parseConfig(config, { DELAY_WARNING: "0", DNS_SERVERS: "127.0.0.1:5353, 10.0.0.2" }),
    ).toMatchObject({
      DELAY_WARNING: 0,
      DNS_SERVERS: ["127.0.0.1:5353", "10.0.0.2"],
    });
  });

  it("names every bad variable", () => {
    let message = "";
    try {
      parseConfig(config, {
        RETRY_SCHEDULE: "1m,soon",
        DNS_SERVERS: "10.0.0.1:99999",
        RETRY_JITTER: "2",
        STALE_DISPATCH: "0",
      });
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      message = (err as Error).message;
    }
    expect(message).toContain("RETRY_SCHEDULE");
    expect(message).toContain("DNS_SERVERS");
    expect(message).toContain("RETRY_JITTER");
    expect(message).toContain("STALE_DISPATCH");
  });
});
