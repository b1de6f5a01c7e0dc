// `npm start -- --nats-cluster 3 --scale delivery=3,mda=2,router=2,mx=2`: what to run. Plain
// `npm start` is one NATS server and one process per service, on the ports it always had.
// Replicas of mx and msa get consecutive ports (mx 2525, 2526, …): every process of the
// pipeline stays reachable on its own, and a person can aim swaks at one replica.
import { parseArgs } from "node:util";

export const SERVICE_NAMES = ["router", "mda", "delivery", "mx", "msa"] as const;
export type ServiceName = (typeof SERVICE_NAMES)[number];

export interface StartPlan {
  /** 1: one nats-server (the plain npm start); more: a JetStream cluster of that many nodes */
  natsNodes: number;
  replicas: Record<ServiceName, number>;
}

export const USAGE =
  "usage: npm start [-- --nats-cluster N] [--scale service=N,…]\n" +
  "  --nats-cluster N   run N nats-servers as one JetStream cluster (streams get min(N, 3) replicas)\n" +
  `  --scale ...        processes per service, e.g. delivery=3,mda=2,router=2,mx=2 (services: ${SERVICE_NAMES.join(", ")})`;

export class UsageError extends Error {}

export function parseStartArgs(argv: string[]): StartPlan {
  let values: { "nats-cluster"?: string; scale?: string[] };
  try {
    ({ values } = parseArgs({
      args: argv,
      options: { "nats-cluster": { type: "string" }, scale: { type: "string", multiple: true } },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n${USAGE}`);
  }
  const count = (what: string, text: string, max: number) => {
    const n = Number(text);
    if (!/^\d+$/.test(text.trim()) || n < 1 || n > max) {
      throw new UsageError(`${what} must be a whole number from 1 to ${max}, not "${text}"\n${USAGE}`);
    }
    return n;
  };
  const natsNodes =
    values["nats-cluster"] === undefined ? 1 : count("--nats-cluster", values["nats-cluster"], 7);
  const replicas = Object.fromEntries(SERVICE_NAMES.map((n) => [n, 1])) as Record<ServiceName, number>;
  for (const part of (values.scale ?? []).flatMap((s) => s.split(",")).filter((s) => s.trim())) {
    const [name, n] = part.split("=").map((s) => s.trim());
    if (!(SERVICE_NAMES as readonly string[]).includes(name ?? "") || n === undefined) {
      throw new UsageError(`--scale takes service=N, not "${part}"\n${USAGE}`);
    }
    replicas[name as ServiceName] = count(`--scale ${name}`, n, 16);
  }
  return { natsNodes, replicas };
}

export interface Instance {
  service: ServiceName;
  /** 0 for the first process of a service */
  replica: number;
  /** the service's name for the first process, then `delivery-2`, `delivery-3`, … */
  name: string;
}

/** Every process to start, in the order of SERVICE_NAMES (each service's replicas together). */
export function instances(plan: StartPlan, available: readonly ServiceName[]): Instance[] {
  return available.flatMap((service) =>
    Array.from({ length: plan.replicas[service] }, (_, replica) => ({
      service,
      replica,
      name: replica === 0 ? service : `${service}-${replica + 1}`,
    })),
  );
}

/**
 * A replica's health port: the first process of the service with index i keeps base + i + 1
 * (19101…19105, as plain npm start), replica r gets base + 10·r + i + 1 (router-2 19111, …).
 */
export function httpPort(base: number, serviceIndex: number, replica: number): number {
  return base + 10 * replica + serviceIndex + 1;
}

/** The nodes of a development NATS cluster: client port base + k, route port base + 100 + k. */
export function natsNodes(
  n: number,
  basePort: number,
): { name: string; port: number; clusterPort: number }[] {
  return Array.from({ length: n }, (_, k) => ({
    name: `n${k + 1}`,
    port: basePort + k,
    clusterPort: basePort + 100 + k,
  }));
}

/** nats-server's configuration file for one node of the development cluster. */
export function natsNodeConfig(
  node: { name: string; port: number; clusterPort: number },
  all: readonly { clusterPort: number }[],
  host: string,
  storeDir: string,
): string {
  return [
    `server_name: ${node.name}`,
    `listen: "${host}:${node.port}"`,
    `jetstream { store_dir: ${JSON.stringify(storeDir)} }`,
    "cluster {",
    "  name: mailpipe-dev",
    `  listen: "${host}:${node.clusterPort}"`,
    `  routes: [${all
      .filter((o) => o.clusterPort !== node.clusterPort)
      .map((o) => `"nats-route://${host}:${o.clusterPort}"`)
      .join(", ")}]`,
    "}",
    "",
  ].join("\n");
}
