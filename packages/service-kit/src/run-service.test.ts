import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Bus } from "@mailpipe/bus";
import { LocalDeliveryRequest, newQueueId, subjects } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import { freePort, type NatsHandle, startNats, startService, tempDir, waitFor } from "@mailpipe/testing";
import { afterEach, describe, expect, it } from "vitest";
import { z } from "zod";
import { baseConfig, ConfigError, duration, parseConfig, redactConfig } from "./index.ts";

const fixture = fileURLToPath(new URL("../test/fixtures/slow-service.ts", import.meta.url));
const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

async function readyz(port: number): Promise<number> {
  try {
    return (await fetch(`http://127.0.0.1:${port}/readyz`)).status;
  } catch {
    return 0;
  }
}

describe("service skeleton", () => {
  it("is ready only once NATS is reachable, and finishes the handler in flight on SIGTERM", async () => {
    const natsPort = await freePort();
    const marks = await tempDir("svc-marks");
    cleanups.push(() => marks.remove());
    const httpPort = await freePort();
    const svc = await startService("slow", {
      entry: fixture,
      env: {
        NATS_URL: `nats://127.0.0.1:${natsPort}`,
        HTTP_PORT: String(httpPort),
        MARK_DIR: marks.path,
        SLOW_MS: "1500ms",
        SHUTDOWN_TIMEOUT: "10s",
      },
      waitReady: false,
    });
    cleanups.push(() => svc.kill());

    // no NATS yet: alive but not ready
    await waitFor(async () => (await readyz(httpPort)) === 503, { timeoutMs: 10_000 });
    await new Promise((r) => setTimeout(r, 500));
    expect(await readyz(httpPort)).toBe(503);
    expect((await fetch(`http://127.0.0.1:${httpPort}/healthz`)).status).toBe(200);

    const nats: NatsHandle = await startNats({ port: natsPort });
    cleanups.push(() => nats.stop());
    await waitFor(async () => (await readyz(httpPort)) === 200, { timeoutMs: 15_000 });

    const telemetry = createTelemetry({ service: "router", logLevel: "silent", defaultMetrics: false });
    const bus = await Bus.connect({ url: nats.url, name: "test", telemetry });
    cleanups.push(() => bus.close());
    const queueId = newQueueId();
    const msg = {
      v: 1 as const,
      queueId,
      dispatchId: `${queueId}.local.1`,
      receivedAt: new Date().toISOString(),
      mailFrom: "",
      recipients: [{ mailbox: "alice@example.test", address: "alice@example.test", attempt: 1 }],
      body: { bucket: "mail-bodies", key: queueId, size: 0, sha256: "0".repeat(64) },
    };
    await bus.publish(subjects.deliverLocal(), LocalDeliveryRequest, msg, { msgId: msg.dispatchId });
    await waitFor(() => existsSync(join(marks.path, "started")), { timeoutMs: 10_000 });

    const t0 = Date.now();
    const code = await svc.stop("SIGTERM", 12_000);
    expect(code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(10_000); // inside SHUTDOWN_TIMEOUT
    expect(readFileSync(join(marks.path, "finished"), "utf8").trim()).toBe(queueId);
    // and it was acked before exit: nothing left for the next replica
    const info = await bus.jsm.consumers.info("MAIL_DELIVER", "mda");
    expect(info.num_ack_pending).toBe(0);
    expect(info.num_pending).toBe(0);
    expect(svc.logs.some((l) => l.includes("slow handler finished"))).toBe(true);
  });

  it("fails fast naming the bad variable, without printing secrets", () => {
    const r = spawnSync(process.execPath, [fixture], {
      env: { ...process.env, HTTP_PORT: "eighty", MARK_DIR: "/tmp", SLOW_MS: "soon", API_TOKEN: "x" },
      encoding: "utf8",
      timeout: 20_000,
    });
    expect(r.status).toBe(78);
    expect(r.stderr).toMatch(/HTTP_PORT: .*\(got "eighty"\)/);
    expect(r.stderr).toMatch(/SLOW_MS: "soon" is not a duration/);
  });
});

describe("config", () => {
  it("parses durations and reports every bad variable", () => {
    const schema = baseConfig.extend({ RETRY: duration("5m"), DB_PASSWORD: z.string().min(12) });
    expect(parseConfig(schema, { DB_PASSWORD: "long-enough-secret" }).RETRY).toBe(300_000);
    let err: unknown;
    try {
      parseConfig(schema, { RETRY: "later", DB_PASSWORD: "short", HTTP_PORT: "99999" });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    const message = (err as Error).message;
    expect(message).toMatch(/RETRY: "later" is not a duration/);
    expect(message).toMatch(/HTTP_PORT: .*99999/);
    expect(message).toMatch(/DB_PASSWORD: /);
    expect(message).not.toContain("short");
  });

  it("redacts secrets and URL passwords for logging", () => {
    expect(
      redactConfig({
        REDIS_URL: "redis://:s3cret@redis:6379",
        SMTP_PASSWORD: "x",
        MAIL_HOSTNAME: "mx.example.test",
      }),
    ).toEqual({
      REDIS_URL: "redis://:[redacted]@redis:6379",
      SMTP_PASSWORD: "[redacted]",
      MAIL_HOSTNAME: "mx.example.test",
    });
    // NATS takes a bare token before the host, and a list of servers
    expect(redactConfig({ NATS_URL: "nats://s3cr3t@nats-0:4222,nats://s3cr3t@nats-1:4222" })).toEqual({
      NATS_URL: "nats://[redacted]@nats-0:4222,nats://[redacted]@nats-1:4222",
    });
  });
});
