// REDIS_WAIT_REPLICAS: the router's handlers return (and the bus acks) only once a Redis replica has
// their writes, so a Sentinel failover to that replica keeps them; with no replica in time the
// handler fails, which makes the bus redeliver the message. Real master and replica.
import { type ServerHandle, startRedis, waitFor } from "@mailpipe/testing";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { waitForReplicas } from "./router.ts";

let master: ServerHandle;
let replica: ServerHandle;
let redis: Redis;
let onReplica: Redis;

beforeAll(async () => {
  master = await startRedis({ appendfsync: "always" });
  replica = await startRedis({ appendfsync: "always", replicaof: master });
  redis = new Redis(master.url);
  onReplica = new Redis(replica.url);
  await waitFor(async () => /master_link_status:up/.test(await onReplica.info("replication")), {
    timeoutMs: 15_000,
    message: "the replica never linked to its master",
  });
}, 60_000);

afterAll(async () => {
  redis?.disconnect();
  onReplica?.disconnect();
  await replica?.stop();
  await master?.stop();
});

const writer = (key: string) => async () => {
  await redis.set(key, "written");
};

describe("REDIS_WAIT_REPLICAS", () => {
  it("returns once the replica has the handler's writes, and fails when no replica confirms them in time", async () => {
    const confirmed = waitForReplicas(redis, 1, 2000);
    await confirmed(writer("first"))(undefined, {} as never);
    // returned: the replica already holds the write
    expect(await onReplica.get("first")).toBe("written");

    // the replica goes away: the write stays on the master alone, and the handler says so
    onReplica.disconnect();
    await replica.kill();
    await waitFor(async () => /connected_slaves:0/.test(await redis.info("replication")), {
      timeoutMs: 15_000,
      message: "the master still counts the killed replica",
    });
    await expect(waitForReplicas(redis, 1, 300)(writer("second"))(undefined, {} as never)).rejects.toThrow(
      /0 of 1 Redis replicas \(REDIS_WAIT_REPLICAS\) have the router's writes after 300 ms/,
    );
    // with 0 (the default) nothing waits
    await waitForReplicas(redis, 0, 300)(writer("third"))(undefined, {} as never);
    expect(await redis.get("third")).toBe("written");
  }, 60_000);
});
