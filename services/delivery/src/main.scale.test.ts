// The real service processes: replicas share the durable consumer, and a killed one loses nothing.
import type { Bus } from "@mailpipe/bus";
import {
  type NatsHandle,
  type ServerHandle,
  type ServiceHandle,
  sequence,
  startNats,
  startRedis,
  startService,
  waitFor,
} from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  collectStatuses,
  connectBus,
  message,
  mx,
  publishRequest,
  resetBus,
  startPeers,
} from "../test/helpers.ts";

let nats: NatsHandle;
let redis: ServerHandle;
let admin: Bus;
const cleanups: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  nats = await startNats();
  // the workers keep their destination slots there
  redis = await startRedis();
  admin = await connectBus(nats.url);
});
afterAll(async () => {
  await admin?.close();
  await nats?.stop();
  await redis?.stop();
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  await resetBus(admin);
});

async function startWorkers(names: string[], port: number, env: Record<string, string> = {}) {
  const workers = await Promise.all(
    names.map((name) =>
      startService("delivery", {
        env: {
          NATS_URL: nats.url,
          REDIS_URL: redis.url,
          MAIL_HOSTNAME: name,
          SMTP_REMOTE_PORT: String(port),
          SMTP_BLOCK_LOCAL_ADDRESSES: "false",
          SHUTDOWN_TIMEOUT: "10s",
          LOG_LEVEL: "info",
          ...env,
        },
      }),
    ),
  );
  cleanups.push(() => Promise.all(workers.map((w) => w.stop())));
  return workers;
}

/** `name/pid`, as each worker puts it in its log lines and on its statuses. */
const idOf = (w: ServiceHandle, name: string) => `${name}/${w.pid}`;

describe("delivery processes", () => {
  it("spreads 300 requests over three workers; every recipient gets exactly one copy", async () => {
    const { port, peers } = await startPeers(["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    cleanups.push(() => Promise.all(peers.map((p) => p.stop())));
    const names = ["w1.sender.test", "w2.sender.test", "w3.sender.test"];
    const workers = await startWorkers(names, port);
    const seen = await collectStatuses(admin);
    cleanups.push(() => seen.stop());

    const destinations = ["one.test", "two.test", "three.test"];
    const expected: string[] = [];
    for (let i = 0; i < 300; i++) {
      const d = i % 3;
      const domain = destinations[d]!;
      const rcpt = `user${i}@${domain}`;
      expected.push(rcpt);
      await publishRequest(admin, {
        domain,
        hosts: [mx(`mx.${domain}`, 10, `127.0.0.${d + 2}`)],
        recipients: [rcpt],
        body: message(`scale ${i}`, rcpt),
      });
    }

    const all = await seen.waitFor(300, 45_000);
    expect(all.every((s) => s.status.outcome === "delivered")).toBe(true);
    const received = peers.flatMap((p) => p.messages.flatMap((m) => m.rcptTo));
    expect(received.sort()).toEqual(expected.slice().sort());

    const byWorker = new Map<string, number>();
    for (const s of all) byWorker.set(s.worker ?? "?", (byWorker.get(s.worker ?? "?") ?? 0) + 1);
    const ids = workers.map((w, i) => idOf(w, names[i]!));
    expect([...byWorker.keys()].sort()).toEqual(ids.slice().sort());
    for (const id of ids) expect(byWorker.get(id)).toBeGreaterThan(0);
    // the peers saw every worker's EHLO name too, and each worker logged its own deliveries
    const helos = new Set(peers.flatMap((p) => p.messages.map((m) => m.helo)));
    expect([...helos].sort()).toEqual(names.slice().sort());
    workers.forEach((w, i) => {
      const line = w.logs.find((l) => l.includes('"msg":"delivered"'));
      expect(line && JSON.parse(line).worker).toBe(ids[i]);
    });
  });

  it("after SIGKILL during DATA, another worker delivers after the ack wait: nothing lost, at most one extra copy", async () => {
    let holder: string | undefined;
    const { port, peers } = await startPeers(["127.0.0.2"], () => ({
      script: {
        // the first transaction sits in DATA for a while; every later one is accepted at once
        data: sequence((ctx) => {
          holder = ctx.helo;
          return { delayMs: 4000 };
        }, "accept"),
      },
    }));
    const [peer] = peers;
    cleanups.push(() => peer!.stop());
    const names = ["k1.sender.test", "k2.sender.test"];
    const workers = await startWorkers(names, port, { DELIVERY_ACK_WAIT: "2s" });
    const seen = await collectStatuses(admin);
    cleanups.push(() => seen.stop());
    const hosts = [mx("mx.remote.test", 10, "127.0.0.2")];

    await publishRequest(admin, {
      domain: "remote.test",
      hosts,
      recipients: ["first@remote.test"],
      body: message("held in DATA", "first@remote.test"),
    });
    const held = await waitFor(() => holder, { message: "no transaction reached DATA" });
    const victim = workers[names.indexOf(held)]!;
    const survivor = workers[1 - names.indexOf(held)]!;
    for (let i = 0; i < 9; i++) {
      await publishRequest(admin, {
        domain: "remote.test",
        hosts,
        recipients: [`r${i}@remote.test`],
        body: message(`after ${i}`, `r${i}@remote.test`),
      });
    }
    await victim.kill();

    const all = await seen.waitFor(10, 30_000);
    const first = seen.of("first@remote.test");
    expect(first).toHaveLength(1);
    expect(first[0]!.status.outcome).toBe("delivered");
    expect(first[0]!.worker).toBe(idOf(survivor, names[1 - names.indexOf(held)]!));
    expect(new Set(all.map((s) => s.status.recipient)).size).toBe(10);
    expect(all.every((s) => s.status.outcome === "delivered")).toBe(true);

    // the dead worker's copy completes at the peer when its delay ends
    await new Promise((r) => setTimeout(r, 4500));
    const copies = (rcpt: string) => peer!.messages.filter((m) => m.rcptTo.includes(rcpt)).length;
    expect(copies("first@remote.test")).toBeGreaterThanOrEqual(1);
    expect(copies("first@remote.test")).toBeLessThanOrEqual(2);
    for (let i = 0; i < 9; i++) {
      expect(copies(`r${i}@remote.test`)).toBeGreaterThanOrEqual(1);
      expect(copies(`r${i}@remote.test`)).toBeLessThanOrEqual(2);
    }
  });
});
