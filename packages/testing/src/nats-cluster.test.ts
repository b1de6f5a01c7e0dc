import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { describe, expect, it } from "vitest";
import { startNatsCluster } from "./nats-cluster.ts";
import { waitFor } from "./process.ts";

describe("startNatsCluster", () => {
  it("runs 3 routed nodes with JetStream; an R3 stream keeps its data through a node's SIGKILL and restart", async () => {
    const cluster = await startNatsCluster();
    try {
      expect(cluster.nodes.map((n) => n.name)).toEqual(["n1", "n2", "n3"]);
      expect(cluster.url.split(",")).toHaveLength(3);
      expect(new Set(cluster.nodes.map((n) => n.storeDir)).size).toBe(3);
      expect(await cluster.metaLeader()).toMatch(/^n[123]$/);
      const routes = (await fetch(`${cluster.nodes[0]!.monitorUrl}/routez`).then((r) => r.json())) as {
        num_routes: number;
      };
      expect(routes.num_routes).toBeGreaterThanOrEqual(2);

      const nc = await connect({ servers: cluster.url.split(","), maxReconnectAttempts: -1 });
      try {
        const jsm = await jetstreamManager(nc);
        await jsm.streams.add({ name: "KEEP", subjects: ["keep.>"], num_replicas: 3 });
        const js = jetstream(nc);
        for (let i = 0; i < 5; i++) await js.publish(`keep.${i}`, String(i));
        const info = await jsm.streams.info("KEEP");
        expect(info.cluster?.replicas?.length).toBe(2); // the leader plus two replicas

        // kill the stream's leader: another node takes over, nothing is lost, writes go on
        const leader = cluster.nodes.find((n) => n.name === info.cluster?.leader)!;
        const firstPid = leader.pid;
        await leader.kill();
        expect(leader.running).toBe(false);
        await waitFor(
          async () => {
            const now = await jsm.streams.info("KEEP");
            return now.cluster?.leader && now.cluster.leader !== leader.name ? now : false;
          },
          { timeoutMs: 30_000, intervalMs: 200, message: "a new stream leader" },
        );
        await waitFor(() => js.publish("keep.after", "x").then(() => true), {
          timeoutMs: 30_000,
          intervalMs: 200,
          message: "a publish after the leader died",
        });
        expect((await jsm.streams.info("KEEP")).state.messages).toBe(6);

        await leader.restart();
        expect(leader.running).toBe(true);
        expect(leader.pid).not.toBe(firstPid);
        // the restarted node catches up from its own store and its peers
        await waitFor(
          async () => {
            const replicas = (await jsm.streams.info("KEEP")).cluster?.replicas ?? [];
            const back = replicas.find((r) => r.name === leader.name);
            return back?.current === true;
          },
          { timeoutMs: 30_000, intervalMs: 200, message: "the restarted node current again" },
        );
      } finally {
        await nc.close();
      }
    } finally {
      await cluster.stop();
    }
  }, 120_000);
});
