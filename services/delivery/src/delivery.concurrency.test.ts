// One destination that hangs must not hold up the others, and never gets more than
// DESTINATION_CONCURRENCY of this worker's transactions.
import type { Bus } from "@mailpipe/bus";
import { type NatsHandle, startNats } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  collectStatuses,
  connectBus,
  message,
  mx,
  publishRequest,
  quietTelemetry,
  resetBus,
  startPeers,
  testConfig,
} from "../test/helpers.ts";
import { startDelivery } from "./service.ts";

let nats: NatsHandle;
let admin: Bus;
const cleanups: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  nats = await startNats();
  admin = await connectBus(nats.url);
});
afterAll(async () => {
  await admin?.close();
  await nats?.stop();
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  await resetBus(admin);
});

describe("per-destination concurrency", () => {
  it("keeps delivering to B while A hangs, with A never above DESTINATION_CONCURRENCY", async () => {
    const LIMIT = 3;
    const { port, peers } = await startPeers(["127.0.0.2", "127.0.0.3"], (host) =>
      host === "127.0.0.2" ? { script: { data: { hang: true } } } : {},
    );
    cleanups.push(() => Promise.all(peers.map((p) => p.stop())));
    const [hanging, fine] = peers;

    const telemetry = quietTelemetry();
    const bus = await connectBus(nats.url, telemetry);
    const delivery = await startDelivery({
      config: testConfig(nats.url, port, {
        DELIVERY_CONCURRENCY: "20",
        DESTINATION_CONCURRENCY: String(LIMIT),
        DESTINATION_BUSY_DELAY: "200ms",
        SMTP_DATA_DONE_TIMEOUT: "8s",
      }),
      bus,
      telemetry,
    });
    cleanups.push(async () => {
      await delivery.stop();
      await bus.close();
    });
    const seen = await collectStatuses(admin);
    cleanups.push(() => seen.stop());

    let maxA = 0;
    const sampler = setInterval(() => {
      maxA = Math.max(maxA, delivery.worker.inFlight("a.test"));
    }, 5);
    cleanups.push(async () => clearInterval(sampler));

    for (let i = 0; i < 6; i++) {
      await publishRequest(admin, {
        domain: "a.test",
        hosts: [mx("mx.a.test", 10, "127.0.0.2")],
        recipients: [`a${i}@a.test`],
        body: message(`a${i}`, `a${i}@a.test`),
      });
    }
    for (let i = 0; i < 20; i++) {
      await publishRequest(admin, {
        domain: "b.test",
        hosts: [mx("mx.b.test", 10, "127.0.0.3")],
        recipients: [`b${i}@b.test`],
        body: message(`b${i}`, `b${i}@b.test`),
      });
    }

    await fine!.waitForMessages(20, 20_000);
    const bDone = await seen.waitFor(20);
    // every B message was delivered while A's first transactions were still hanging
    expect(bDone.map((s) => s.status.destination)).toEqual(Array(20).fill("b.test"));
    expect(bDone.every((s) => s.status.outcome === "delivered")).toBe(true);

    const all = await seen.waitFor(26, 40_000);
    const a = all.filter((s) => s.status.destination === "a.test");
    expect(a).toHaveLength(6);
    for (const s of a) {
      expect(s.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.4.2" } });
    }
    expect(maxA).toBe(LIMIT);
    expect(hanging!.transactions).toBe(6);
    const text = await telemetry.metrics.text();
    const busy = Number(/^mailpipe_delivery_destination_busy_total\S* (\d+)/m.exec(text)?.[1] ?? 0);
    expect(busy).toBeGreaterThan(0);
  });
});
