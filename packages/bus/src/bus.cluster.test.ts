// JS_REPLICAS against a real 3-node JetStream cluster: every stream, durable consumer and the body
// bucket get the replicas asked for; fewer on an existing one are raised; a refusal says what to do.
import { Writable } from "node:stream";
import { type ConsumerKey, LocalDeliveryRequest, topology } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import { type NatsClusterHandle, startNatsCluster, waitFor } from "@mailpipe/testing";
import type { JetStreamManager } from "@nats-io/jetstream";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { Bus } from "./index.ts";

let cluster: NatsClusterHandle;
const open: Bus[] = [];

beforeAll(async () => {
  cluster = await startNatsCluster();
}, 60_000);
afterAll(async () => {
  await cluster?.stop();
});
afterEach(async () => {
  await Promise.all(open.splice(0).map((b) => b.close().catch(() => {})));
});

const BUCKET_STREAM = `OBJ_${topology.bodyBucket}`;
const CONSUMERS: ConsumerKey[] = ["router", "routerStatus", "delivery", "mda"];

async function connect(replicas: number, warnings: string[] = []): Promise<Bus> {
  const logs = new Writable({
    write(chunk, _e, cb) {
      for (const line of chunk.toString().split("\n")) {
        if (!line) continue;
        const entry = JSON.parse(line) as { level: string; msg: string };
        if (entry.level === "warn") warnings.push(entry.msg);
      }
      cb();
    },
  });
  const bus = await Bus.connect({
    url: cluster.url,
    name: `replicas-${replicas}`,
    telemetry: createTelemetry({ service: "router", logDestination: logs, defaultMetrics: false }),
    topology: { replicas },
  });
  open.push(bus);
  return bus;
}

/** replicas as configured, and peers as placed (the leader plus its followers) */
async function streamReplicas(jsm: JetStreamManager, name: string) {
  const info = await jsm.streams.info(name);
  return { config: info.config.num_replicas, peers: 1 + (info.cluster?.replicas?.length ?? 0) };
}

async function consumerReplicas(jsm: JetStreamManager, key: ConsumerKey) {
  const def = topology.consumers[key];
  const info = await jsm.consumers.info(def.stream, def.durable);
  return {
    config: info.config.num_replicas || (await jsm.streams.info(def.stream)).config.num_replicas,
    peers: 1 + (info.cluster?.replicas?.length ?? 0),
  };
}

/** the replicas once every peer is placed (a new one shows in the info a moment after create or update) */
async function onThreePeers(what: string, read: () => Promise<{ config: number; peers: number }>) {
  try {
    return await waitFor(
      async () => {
        const r = await read();
        return r.peers === 3 ? r : false;
      },
      { timeoutMs: 30_000, intervalMs: 200 },
    );
  } catch {
    return { what, ...(await read()) }; // fails the comparison, naming what
  }
}

async function deleteAll(jsm: JetStreamManager): Promise<void> {
  for (const s of [...Object.values(topology.streams).map((d) => d.name), BUCKET_STREAM]) {
    await jsm.streams.delete(s).catch(() => {});
  }
}

async function bindAll(bus: Bus): Promise<void> {
  for (const key of CONSUMERS) {
    const sub = await bus.consume(key, LocalDeliveryRequest, () => {}, { maxInFlight: 1, ackWaitMs: 1000 });
    await sub.stop();
  }
}

describe("JS_REPLICAS on a 3-node cluster", () => {
  it("creates every stream (the spool too), every durable consumer and the body bucket with 3 replicas", async () => {
    const bus = await connect(3);
    await deleteAll(bus.jsm);
    await bus.ensureTopology();
    await bindAll(bus);
    const streams = [...Object.values(topology.streams).map((d) => d.name), BUCKET_STREAM];
    expect(streams).toContain("MAIL_SPOOL");
    for (const name of streams) {
      expect(await onThreePeers(`stream ${name}`, () => streamReplicas(bus.jsm, name))).toEqual({
        config: 3,
        peers: 3,
      });
    }
    for (const key of CONSUMERS) {
      expect(await onThreePeers(`consumer ${key}`, () => consumerReplicas(bus.jsm, key))).toEqual({
        config: 3,
        peers: 3,
      });
    }
  }, 60_000);

  it("raises streams, consumers and the body bucket made with 1 replica to 3, keeping their data", async () => {
    const old = await connect(1);
    await deleteAll(old.jsm);
    await old.ensureTopology();
    await bindAll(old);
    const bodies = await old.bodies();
    const ref = await bodies.put("kept-body", Buffer.from("a body stored while the bucket had one replica"));
    expect(await streamReplicas(old.jsm, BUCKET_STREAM)).toEqual({ config: 1, peers: 1 });
    expect(await consumerReplicas(old.jsm, "mda")).toEqual({ config: 1, peers: 1 });

    const bus = await connect(3);
    await bus.ensureTopology();
    await bindAll(bus);
    for (const name of [...Object.values(topology.streams).map((d) => d.name), BUCKET_STREAM]) {
      expect(await onThreePeers(`stream ${name}`, () => streamReplicas(bus.jsm, name))).toEqual({
        config: 3,
        peers: 3,
      });
    }
    for (const key of CONSUMERS) {
      expect(await onThreePeers(`consumer ${key}`, () => consumerReplicas(bus.jsm, key))).toEqual({
        config: 3,
        peers: 3,
      });
    }
    expect((await (await bus.bodies()).readBuffer(ref)).toString()).toBe(
      "a body stored while the bucket had one replica",
    );
  }, 60_000);

  it("keeps 3 replicas when a service starts with a lower JS_REPLICAS, and says so", async () => {
    const bus = await connect(3);
    await deleteAll(bus.jsm);
    await bus.ensureTopology();
    const warnings: string[] = [];
    const low = await connect(1, warnings);
    await low.ensureTopology();
    expect(await onThreePeers("MAIL_SPOOL", () => streamReplicas(low.jsm, "MAIL_SPOOL"))).toEqual({
      config: 3,
      peers: 3,
    });
    expect(await onThreePeers(BUCKET_STREAM, () => streamReplicas(low.jsm, BUCKET_STREAM))).toEqual({
      config: 3,
      peers: 3,
    });
    expect(warnings).toContain(
      "stream MAIL_SPOOL has 3 replicas and JS_REPLICAS is 1: kept at 3; set JS_REPLICAS=3 on every service, " +
        "or lower the stream yourself (nats stream edit MAIL_SPOOL --replicas 1)",
    );
    expect(
      warnings.some((w) => w.startsWith("the body bucket mail-bodies has 3 replicas and JS_REPLICAS is 1")),
    ).toBe(true);
  }, 60_000);

  it("refuses a body bucket it cannot raise, saying what to do", async () => {
    const old = await connect(1);
    await deleteAll(old.jsm);
    await old.bodies();
    // 5 replicas on 3 nodes: JetStream cannot place them
    const bus = await connect(5);
    await expect(bus.bodies()).rejects.toThrow(
      /the body bucket mail-bodies has 1 replica\(s\) and JS_REPLICAS is 5; raising it failed \(.+\): once 5 NATS nodes are up, run `nats stream edit OBJ_mail-bodies --replicas 5` or restart this service, or set JS_REPLICAS=1/,
    );
    expect(await streamReplicas(bus.jsm, BUCKET_STREAM)).toEqual({ config: 1, peers: 1 });
  }, 60_000);
});
