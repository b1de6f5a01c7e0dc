import { reply } from "@mailpipe/contracts";
import { type ServiceHandle, startService, waitFor } from "@mailpipe/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  type Environment,
  MAIL_HOSTNAME,
  type Peers,
  startEnvironment,
  startPeers,
} from "../test/harness.ts";

let env: Environment;
let peers: Peers;
let service: ServiceHandle | undefined;

beforeAll(async () => {
  env = await startEnvironment();
  peers = await startPeers(env);
});
afterAll(async () => {
  await service?.kill();
  await peers?.stop();
  await env?.stop();
});

async function metrics(svc: ServiceHandle): Promise<string> {
  return (await fetch(svc.url("/metrics"))).text();
}

describe("router process", () => {
  it("starts from its environment, routes and schedules, reports queue metrics and stops cleanly", async () => {
    service = await startService("router", {
      env: {
        NATS_URL: env.nats.url,
        REDIS_URL: env.redis.url,
        MAIL_HOSTNAME,
        DIRECTORY_FILE: env.directoryFile,
        DNS_SERVERS: env.dns.address,
        RETRY_SCHEDULE: "1h",
        LOG_LEVEL: "info",
      },
    });
    const mail = await peers.queue({ rcptTo: ["one@remote.test"] });
    const req = await peers.waitRemote((q) => q.queueId === mail.queueId, "the remote request");
    expect(req.destination.hosts[0]?.exchange).toBe("mx1.remote.test");
    await peers.status(req, "one@remote.test", "deferred", reply(451, "4.4.1", "try later"));

    const text = await waitFor(
      async () => {
        const t = await metrics(service!);
        return /^mailpipe_queue_scheduled\{[^}]*\} 1$/m.test(t) ? t : null;
      },
      { message: "queue_scheduled gauge at 1" },
    );
    expect(text).toMatch(/^mailpipe_router_routed_total\{[^}]*kind="remote"[^}]*\} 1$/m);
    expect(text).toMatch(/^mailpipe_queue_oldest_age_seconds\{[^}]*\} \d/m);
    const line = await service.waitForLog("recipient deferred");
    expect(JSON.parse(line)).toMatchObject({ service: "router", queueId: mail.queueId });

    expect(await service.stop()).toBe(0);
    service = undefined;
  });
});
