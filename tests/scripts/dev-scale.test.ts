// `npm start -- --nats-cluster N --scale service=N,…`: what it runs and on which ports.
import { describe, expect, it } from "vitest";
import {
  httpPort,
  instances,
  natsNodeConfig,
  natsNodes,
  parseStartArgs,
  SERVICE_NAMES,
} from "../../scripts/dev-scale.ts";

describe("npm start's scale options", () => {
  it("runs one nats-server and one process per service without options", () => {
    const plan = parseStartArgs([]);
    expect(plan).toEqual({ natsNodes: 1, replicas: { router: 1, mda: 1, delivery: 1, mx: 1, msa: 1 } });
    expect(instances(plan, SERVICE_NAMES).map((i) => i.name)).toEqual([
      "router",
      "mda",
      "delivery",
      "mx",
      "msa",
    ]);
    // the ports plain npm start always had
    expect(SERVICE_NAMES.map((_, i) => httpPort(19100, i, 0))).toEqual([19101, 19102, 19103, 19104, 19105]);
  });

  it("reads the README's example", () => {
    const plan = parseStartArgs(["--nats-cluster", "3", "--scale", "delivery=3,mda=2,router=2,mx=2"]);
    expect(plan.natsNodes).toBe(3);
    const all = instances(plan, SERVICE_NAMES);
    expect(all.map((i) => i.name)).toEqual([
      "router",
      "router-2",
      "mda",
      "mda-2",
      "delivery",
      "delivery-2",
      "delivery-3",
      "mx",
      "mx-2",
      "msa",
    ]);
    const ports = all.map((i) => httpPort(19100, SERVICE_NAMES.indexOf(i.service), i.replica));
    expect(new Set(ports).size).toBe(ports.length);
    expect(parseStartArgs(["--scale", "mx=2", "--scale", "msa=2"]).replicas).toMatchObject({ mx: 2, msa: 2 });
  });

  it("refuses what it cannot run, with the usage", () => {
    expect(() => parseStartArgs(["--scale", "smtp=2"])).toThrow(
      /--scale takes service=N, not "smtp=2"[\s\S]*usage: npm start/,
    );
    expect(() => parseStartArgs(["--scale", "mx=0"])).toThrow(
      /--scale mx must be a whole number from 1 to 16, not "0"/,
    );
    expect(() => parseStartArgs(["--nats-cluster", "three"])).toThrow(
      /--nats-cluster must be a whole number/,
    );
    expect(() => parseStartArgs(["--replicas", "2"])).toThrow(/usage: npm start/);
  });

  it("routes every node of the development cluster to the others", () => {
    const nodes = natsNodes(3, 14222);
    expect(nodes).toEqual([
      { name: "n1", port: 14222, clusterPort: 14322 },
      { name: "n2", port: 14223, clusterPort: 14323 },
      { name: "n3", port: 14224, clusterPort: 14324 },
    ]);
    const conf = natsNodeConfig(nodes[1]!, nodes, "127.0.0.1", "/data/n2");
    expect(conf).toContain("server_name: n2");
    expect(conf).toContain('listen: "127.0.0.1:14223"');
    expect(conf).toContain('jetstream { store_dir: "/data/n2" }');
    expect(conf).toContain('routes: ["nats-route://127.0.0.1:14322", "nats-route://127.0.0.1:14324"]');
  });
});
