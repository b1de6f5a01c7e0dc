// Redis failover under load: a master and one replica (`replicaof`, both AOF with fsync always), a
// real Sentinel watching the master, and mx, msa, router, mda and delivery finding Redis through the
// Sentinel (REDIS_SENTINELS; REDIS_URL points nowhere). Under steady SMTP load (bounded in count and
// time) the master is SIGKILLed; the Sentinel promotes the replica and the services reconnect to it.
// The remote sink defers every first attempt, so retries sit in Redis's schedule across the failover.
// Counted by Message-ID in the Maildirs and at a remote sink: every message answered 250 arrives
// exactly once, and a message refused meanwhile got a 4xx.
import {
  freePort,
  type ServerHandle,
  startRedis,
  startRedisSentinel,
  startSmtpPeer,
  waitFor,
} from "@mailpipe/testing";
import { Redis } from "ioredis";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, describe, expect, it } from "vitest";
import { type Pipeline, startPipeline } from "./harness.ts";
import { countArrivals, maildirIds, messageId, tally } from "./mail-count.ts";

/** the load stops at this many messages even if the failover is not done */
const MAX_MESSAGES = 800;
/** and after this long */
const MAX_LOAD_MS = 120_000;
/** concurrent SMTP clients, each sending one message per connection */
const CLIENTS = 4;
/** pause between one client's messages */
const PACE_MS = 100;

type Phase = "before" | "failover" | "after";
const PHASES: Phase[] = ["before", "failover", "after"];

interface Attempt {
  id: string;
  phase: Phase;
  route: "mx" | "msa";
  at: number;
  accepted: boolean;
  /** the reply code, or the connection error */
  reply: string;
}

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterAll(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** One command to a Redis or Sentinel, on a connection of its own that gives up at once. */
async function ask(server: Pick<ServerHandle, "host" | "port">, ...args: string[]): Promise<unknown> {
  const r = new Redis({
    host: server.host,
    port: server.port,
    lazyConnect: true,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    connectTimeout: 2000,
  });
  r.on("error", () => {});
  try {
    await r.connect();
    return await r.call(args[0]!, ...args.slice(1));
  } finally {
    r.disconnect();
  }
}

describe("Redis through Sentinel, under load", () => {
  it("delivers every accepted message when the Redis master is SIGKILLed and the replica promoted", async () => {
    // the sink defers each remote recipient's first attempt: their retries wait in Redis's schedule
    // (and nowhere else) when the master dies
    const deferred = new Set<string>();
    const sink = await startSmtpPeer({
      host: "127.0.0.2",
      port: await freePort("127.0.0.2"),
      script: {
        rcpt: ({ recipient }) => {
          if (!recipient || deferred.has(recipient)) return "accept";
          deferred.add(recipient);
          return { reply: 451, text: "4.3.2 try again later" };
        },
      },
    });
    cleanups.push(() => sink.stop());
    const p: Pipeline = await startPipeline({
      services: [],
      redisAppendfsync: "always",
      dns: {
        "remote.test": { MX: [{ exchange: "mx.remote.test", priority: 10 }] },
        "mx.remote.test": { A: ["127.0.0.2"] },
      },
      env: {
        SMTP_REMOTE_PORT: String(sink.port),
        RETRY_SCHEDULE: "2s",
        RATE_MESSAGES_PER_HOUR: "100000",
        DELIVERY_ACK_WAIT: "10s",
        MDA_ACK_WAIT: "10s",
        DESTINATION_SLOT_LEASE: "5s",
        SHUTDOWN_TIMEOUT: "5s",
        LOG_LEVEL: "warn",
      },
    });
    cleanups.push(() => p.stop());
    const master = p.redis;
    const replica = await startRedis({ appendfsync: "always", replicaof: master });
    cleanups.push(() => replica.stop());
    await waitFor(
      async () => /master_link_status:up/.test(String(await ask(replica, "INFO", "replication"))),
      { timeoutMs: 30_000, intervalMs: 200, message: "the replica in sync with the master" },
    );
    const sentinel = await startRedisSentinel(master);
    cleanups.push(() => sentinel.stop());
    // the Sentinel learns the replica from the master's INFO; without it there is nothing to promote
    await waitFor(
      async () => {
        const replicas = (await ask(sentinel, "SENTINEL", "REPLICAS", sentinel.masterName)) as string[][];
        return replicas.some((r) => r.includes(String(replica.port)));
      },
      { timeoutMs: 30_000, intervalMs: 200, message: "the Sentinel knows the replica" },
    );
    const masterPort = async () =>
      Number(
        ((await ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", sentinel.masterName)) as string[])[1],
      );
    expect(await masterPort()).toBe(master.port);

    const viaSentinel = {
      REDIS_SENTINELS: `${sentinel.host}:${sentinel.port}`,
      REDIS_SENTINEL_NAME: sentinel.masterName,
      // nothing listens there: the master must come from the Sentinel
      REDIS_URL: "redis://ignored.invalid:1",
    };
    for (const name of ["router", "mda", "delivery", "mx", "msa"] as const)
      await p.start(name, name, viaSentinel);

    // --- load ---------------------------------------------------------------------------------
    const transports = {
      mx: nodemailer.createTransport({
        host: "127.0.0.1",
        port: p.ports.mx,
        tls: { rejectUnauthorized: false },
        connectionTimeout: 10_000,
        greetingTimeout: 10_000,
        socketTimeout: 40_000,
      } as TransportOptions),
      msa: nodemailer.createTransport({
        host: "127.0.0.1",
        port: p.ports.submission,
        requireTLS: true,
        tls: { rejectUnauthorized: false },
        auth: { user: "alice@example.test", pass: "alice-dev-password" },
        connectionTimeout: 10_000,
        greetingTimeout: 10_000,
        socketTimeout: 40_000,
      } as TransportOptions),
    };
    const attempts: Attempt[] = [];
    let phase: Phase = "before";
    let stopLoad = false;
    let seq = 0;
    const started = Date.now();
    const send = async (n: number): Promise<void> => {
      const route = n % 2 === 0 ? "mx" : "msa";
      const id = `<failover-${n}@load.test>`;
      const to =
        route === "mx"
          ? n % 4 === 0
            ? "alice@example.test"
            : "bob@example.test"
          : n % 4 === 1
            ? "bob@example.test"
            : `user${n}@remote.test`;
      const from = route === "mx" ? "someone@elsewhere.test" : "alice@example.test";
      const attempt: Attempt = { id, phase, route, at: Date.now(), accepted: false, reply: "" };
      try {
        const info = await transports[route].sendMail({
          envelope: { from, to: [to] },
          raw: `From: <${from}>\r\nTo: <${to}>\r\nSubject: failover ${n}\r\nMessage-ID: ${id}\r\nDate: ${new Date().toUTCString()}\r\n\r\nmessage ${n}\r\n`,
        });
        attempt.accepted = /^250[ -]/.test(info.response);
        attempt.reply = info.response.slice(0, 3);
      } catch (err) {
        const e = err as { responseCode?: number; code?: string; message: string };
        attempt.reply = e.responseCode ? String(e.responseCode) : (e.code ?? e.message);
      }
      attempts.push(attempt);
    };
    const clients = Array.from({ length: CLIENTS }, async () => {
      while (!stopLoad && seq < MAX_MESSAGES && Date.now() - started < MAX_LOAD_MS) {
        await send(seq++);
        await new Promise((r) => setTimeout(r, PACE_MS));
      }
    });
    const acceptedSince = async (n: number) => {
      const before = attempts.filter((a) => a.accepted).length;
      await waitFor(() => attempts.filter((a) => a.accepted).length >= before + n, {
        timeoutMs: 60_000,
        intervalMs: 100,
        message: `${n} more messages accepted`,
      });
    };

    // --- the failover -------------------------------------------------------------------------
    let killedAt = 0;
    let promotedAt = 0;
    let replicaOffsetAtKill = "";
    try {
      await acceptedSince(30);
      phase = "failover";
      const info = String(await ask(master, "INFO", "replication"));
      replicaOffsetAtKill = `last master_repl_offset read ${/master_repl_offset:(\d+)/.exec(info)?.[1]}, replica acked ${/slave0:[^\r\n]*offset=(\d+)/.exec(info)?.[1]}`;
      killedAt = Date.now();
      await master.kill();
      await waitFor(async () => (await masterPort()) === replica.port, {
        timeoutMs: 60_000,
        intervalMs: 100,
        message: "the Sentinel names the replica as master",
      });
      promotedAt = Date.now();
      // the old master's replication stream the replica had when it was promoted
      const promoted = String(await ask(replica, "INFO", "replication"));
      replicaOffsetAtKill += `; promoted with ${/second_repl_offset:(-?\d+)/.exec(promoted)?.[1]} of it`;
      await acceptedSince(30);
      phase = "after";
      await acceptedSince(30);
    } finally {
      stopLoad = true;
      await Promise.all(clients);
    }

    // --- count --------------------------------------------------------------------------------
    const arrived = async () => [
      ...(await maildirIds(p.maildirRoot)),
      ...sink.messages.map((m) => messageId(m.raw)),
    ];
    const seen = await countArrivals(attempts, arrived);
    const { rows, table } = tally("phase", PHASES, attempts, (a) => a.phase, seen);
    const lost = rows.flatMap((r) => r.lost);
    const duplicates = rows.flatMap((r) => r.duplicates);
    const refused = attempts.filter((a) => !a.accepted);
    const refusedReplies = [...new Set(refused.map((a) => a.reply))];
    // what the services said about a lost message (its Message-ID, or the queue id logged beside it)
    const evidence = lost.flatMap((id) =>
      [...p.services.entries()].flatMap(([name, s]) =>
        s.logs.filter((l) => l.includes(id.slice(1, -1))).map((l) => `${name}: ${l}`),
      ),
    );
    console.log(
      `${table}\n\n` +
        `master killed at +${((killedAt - started) / 1000).toFixed(1)} s (${replicaOffsetAtKill}); ` +
        `replica named master ${promotedAt - killedAt} ms later\n` +
        `refusals: ${refusedReplies.join(", ") || "none"}` +
        (refused.length
          ? ` (${refused.length}, from ${refused[0]!.at - killedAt} ms to ${refused.at(-1)!.at - killedAt} ms after the kill)`
          : "") +
        `\nduplicates: ${duplicates.join(" ") || "none"}\n` +
        `lost: ${lost.join(" ") || "none"}\n` +
        (evidence.length ? `logs of the lost:\n${evidence.join("\n")}\n` : "") +
        `remote recipients deferred once (their retries waited in Redis): ${deferred.size}\n` +
        `log lines per service after the kill: ${[...p.services.entries()].map(([n, h]) => `${n} ${h.logs.length}`).join(", ")}\n` +
        `${attempts.length} attempts in ${((Date.now() - started) / 1000).toFixed(0)} s`,
    );

    // a message that was never answered 250 may still arrive (the reply was lost); one that was must
    expect(lost).toEqual([]);
    expect(duplicates).toEqual([]);
    // no SMTP process crashed: a refusal is a 4xx (try again later), never a 5xx or a dropped connection
    for (const reply of refusedReplies) expect(reply).toMatch(/^4\d\d$/);
    for (const r of rows) expect(r.accepted, `messages accepted ${r.group} the failover`).toBeGreaterThan(0);
  }, 300_000);
});
