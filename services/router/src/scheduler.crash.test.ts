// A router process SIGKILLed while it holds a retry claim does not strand the retry: the claim's
// lease runs out and another router takes it, once.

import { reply } from "@mailpipe/contracts";
import { MailQueue } from "@mailpipe/queue";
import { type ServiceHandle, startService, waitFor } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  type Environment,
  MAIL_HOSTNAME,
  type Peers,
  startEnvironment,
  startPeers,
  startTestRouter,
  type TestRouter,
} from "../test/harness.ts";

let env: Environment;
let peers: Peers | undefined;
let routerProcess: ServiceHandle | undefined;
let survivor: TestRouter | undefined;
let redis: Redis | undefined;

beforeAll(async () => {
  env = await startEnvironment();
});
afterAll(async () => {
  await env?.stop();
});
afterEach(async () => {
  await routerProcess?.kill();
  await survivor?.stop();
  await peers?.stop();
  redis?.disconnect();
});

const settings = {
  RETRY_SCHEDULE: "1s,1s",
  RETRY_JITTER: "0",
  SCHEDULER_INTERVAL: "100ms",
  SCHEDULER_LEASE: "2s",
  QUEUE_LIFETIME: "1h",
  DELAY_WARNING: "0",
};

describe("a router that dies holding a retry claim", () => {
  it("does not strand it: the lease runs out and another router dispatches it once", async () => {
    await env.reset();
    // mx2 never answers: each lookup of slow.test's hosts waits the resolver's timeout for it, and
    // the router holds the claim (renewing its lease) all that time
    env.dns.set("slow.test", {
      MX: [
        { exchange: "mx1.slow.test", priority: 10 },
        { exchange: "mx2.slow.test", priority: 20 },
      ],
    });
    env.dns.set("mx1.slow.test", { A: ["127.0.0.2"] });
    env.dns.set("mx2.slow.test", { timeout: true });
    peers = await startPeers(env);
    redis = new Redis(env.redis.url);
    const queue = new MailQueue(redis);
    routerProcess = await startService("router", {
      env: {
        NATS_URL: env.nats.url,
        REDIS_URL: env.redis.url,
        DIRECTORY_FILE: env.directoryFile,
        DNS_SERVERS: env.dns.address,
        MAIL_HOSTNAME,
        LOG_LEVEL: "warn",
        ...settings,
      },
    });
    const mail = await peers.queue({ rcptTo: ["one@slow.test"] });
    const first = await peers.waitRemote((q) => q.queueId === mail.queueId, "attempt 1", 30_000);
    await peers.status(first, "one@slow.test", "deferred", reply(451, "4.4.1", "Connection refused"));

    // the retry is claimed and its lookup runs: kill the router now
    await waitFor(async () => (await queue.stats()).inFlight === 1, {
      timeoutMs: 20_000,
      intervalMs: 20,
      message: "the retry claimed",
    });
    await routerProcess.kill();
    const attempt2 = () =>
      peers!.remote.filter((q) => q.queueId === mail.queueId && q.recipients[0]!.attempt === 2);
    expect(attempt2()).toHaveLength(0);
    expect((await queue.stats()).inFlight).toBe(1); // the claim outlives its holder

    survivor = await startTestRouter(env, settings);
    const second = await waitFor(() => (attempt2().length > 0 ? attempt2()[0] : undefined), {
      timeoutMs: 30_000,
      message: "attempt 2 dispatched by the other router",
    });
    expect(survivor.logs.some((l) => l.includes("jobs whose lease expired are due again"))).toBe(true);
    await peers.status(second, "one@slow.test", "delivered", reply(250, "2.0.0", "OK"));
    await waitFor(() => survivor!.queue.isFinished(mail.queueId), { message: "message final" });
    expect(attempt2()).toHaveLength(1);
    expect(await survivor.metric("router_retries_dispatched_total")).toBe(1);
  }, 90_000);
});
