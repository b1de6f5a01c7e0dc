import { reply } from "@mailpipe/contracts";
import { waitFor } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  type Environment,
  type Peers,
  startEnvironment,
  startPeers,
  startTestRouter,
  type TestRouter,
} from "../test/harness.ts";

let env: Environment;
let peers: Peers;
const routers: TestRouter[] = [];

beforeAll(async () => {
  env = await startEnvironment();
});
afterAll(async () => {
  await env?.stop();
});
beforeEach(async () => {
  await env.reset();
  peers = await startPeers(env);
});
afterEach(async () => {
  for (const r of routers.splice(0)) await r.stop();
  await peers?.stop();
});

async function router(overrides: Record<string, string> = {}): Promise<TestRouter> {
  const r = await startTestRouter(env, overrides);
  routers.push(r);
  return r;
}

const tempFailure = reply(451, "4.4.1", "Connection refused");

describe("scheduler", () => {
  it("still retries after Redis restarts (AOF) while retries are scheduled", async () => {
    const r = await router({ RETRY_SCHEDULE: "2s" });
    const mail = await peers.queue({ rcptTo: ["one@remote.test", "two@other.test"] });
    for (const domain of ["remote.test", "other.test"]) {
      const req = await peers.waitRemote(
        (q) => q.queueId === mail.queueId && q.destination.domain === domain,
        `attempt 1 to ${domain}`,
      );
      await peers.status(req, req.recipients[0]!.address, "deferred", tempFailure);
    }
    await waitFor(async () => (await r.queue.stats()).scheduled === 2, { message: "two retries scheduled" });

    await env.redis.restart();

    const retried = await waitFor(
      () => {
        const second = peers.remote.filter(
          (q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 2,
        );
        return second.length === 2 ? second : null;
      },
      { timeoutMs: 15_000, message: "both retries dispatched after the restart" },
    );
    expect(retried.map((q) => q.destination.domain).sort()).toEqual(["other.test", "remote.test"]);
    for (const req of retried) {
      await peers.status(req, req.recipients[0]!.address, "delivered", reply(250, "2.0.0", "OK"));
    }
    await waitFor(async () => (await r.queue.getMessage(mail.queueId).catch(() => undefined)) === null, {
      message: "message final",
    });
  });

  it("publishes a retry once when its DNS lookup outlasts the scheduler lease, with two routers", async () => {
    // mx2 never answers: every lookup of slow.test waits the resolver's 500 ms timeout for it
    env.dns.set("slow.test", {
      MX: [
        { exchange: "mx1.slow.test", priority: 10 },
        { exchange: "mx2.slow.test", priority: 20 },
      ],
    });
    env.dns.set("mx1.slow.test", { A: ["127.0.0.2"] });
    env.dns.set("mx2.slow.test", { timeout: true });
    const settings = { RETRY_SCHEDULE: "1s", SCHEDULER_INTERVAL: "20ms", SCHEDULER_LEASE: "300ms" };
    const a = await router(settings);
    const b = await router(settings);
    const mail = await peers.queue({ rcptTo: ["one@slow.test"] });
    const first = await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1");
    expect(first.destination.hosts.map((h) => h.exchange)).toEqual(["mx1.slow.test"]);
    await peers.status(first, "one@slow.test", "deferred", tempFailure);

    const second = await peers.waitRemote(
      (q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 2,
      "attempt 2",
      15_000,
    );
    await new Promise((r) => setTimeout(r, 2000)); // several leases and lookups later
    // every publish counts, including any JetStream would have deduplicated
    const published =
      (await a.metric("router_retries_dispatched_total")) +
      (await b.metric("router_retries_dispatched_total"));
    expect(published).toBe(1);
    const sends = [...a.spans.getFinishedSpans(), ...b.spans.getFinishedSpans()].filter(
      (s) =>
        s.name.startsWith("send mail.v1.deliver.remote") && s.attributes["mail.queue_id"] === mail.queueId,
    );
    expect(sends).toHaveLength(2); // attempt 1 and attempt 2
    expect(peers.remote.filter((q) => q.queueId === mail.queueId)).toHaveLength(2);

    await peers.status(second, "one@slow.test", "delivered", reply(250, "2.0.0", "OK"));
    await waitFor(() => a.queue.isFinished(mail.queueId), { message: "message final" });
  });

  it("shares due retries between two routers without dispatching any twice", async () => {
    const settings = { RETRY_SCHEDULE: "1s", SCHEDULER_BATCH: "3", SCHEDULER_INTERVAL: "50ms" };
    const a = await router(settings);
    const b = await router(settings);
    const mails = [];
    for (let i = 0; i < 12; i++)
      mails.push(await peers.queue({ rcptTo: [`u${i}@remote.test`, `u${i}@other.test`] }));
    const ids = new Set(mails.map((m) => m.queueId));
    const firsts = await waitFor(
      () => {
        const got = peers.remote.filter((q) => ids.has(q.queueId));
        return got.length === 24 ? got : null;
      },
      { message: "24 first attempts" },
    );
    for (const req of firsts) await peers.status(req, req.recipients[0]!.address, "deferred", tempFailure);

    const seconds = await waitFor(
      () => {
        const got = peers.remote.filter((q) => ids.has(q.queueId) && q.recipients[0]!.attempt === 2);
        return got.length >= 24 ? got : null;
      },
      { timeoutMs: 15_000, message: "24 retries" },
    );
    await new Promise((r) => setTimeout(r, 500));
    const again = peers.remote.filter((q) => ids.has(q.queueId) && q.recipients[0]!.attempt === 2);
    expect(again).toHaveLength(24);
    const keys = seconds.map((q) => `${q.queueId} ${q.recipients.map((x) => x.address).join(",")}`);
    expect(new Set(keys).size).toBe(24);

    // every publish counts, including any JetStream would have deduplicated
    const byA = await a.metric("router_retries_dispatched_total");
    const byB = await b.metric("router_retries_dispatched_total");
    expect(byA + byB).toBe(24);
    expect(byA).toBeGreaterThan(0);
    expect(byB).toBeGreaterThan(0);
  });
});
