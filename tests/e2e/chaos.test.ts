// Replicas of every service on a 3-node JetStream cluster (R3) lose nothing: 2 mx, 2 msa, 2 router,
// 2 mda and 3 delivery processes, Redis, DNS on loopback and a remote SMTP sink, under steady SMTP
// load (bounded in count and time). During the load one nats-server is SIGKILLed and restarted, then
// one replica of each service is SIGKILLed and replaced. Counted by Message-ID in the Maildirs and
// at the sink: every message answered 250 arrives, duplicates stay within one per crash.
import { freePort, type ServiceHandle, type SmtpPeer, startSmtpPeer, waitFor } from "@mailpipe/testing";
import nodemailer, { type Transporter, type TransportOptions } from "nodemailer";
import { afterAll, describe, expect, it } from "vitest";
import { type Pipeline, type ServiceName, startPipeline } from "./harness.ts";
import { countArrivals, maildirIds, messageId, tally } from "./mail-count.ts";

/** the load stops at this many messages even if the faults are not done */
const MAX_MESSAGES = 1500;
/** and after this long */
const MAX_LOAD_MS = 150_000;
/** concurrent SMTP clients, each sending one message per connection */
const CLIENTS = 4;
/** pause between one client's messages */
const PACE_MS = 150;

type Fault = "none" | "nats node" | ServiceName;
const FAULTS: Fault[] = ["none", "nats node", "router", "mx", "msa", "mda", "delivery"];

interface Attempt {
  id: string;
  fault: Fault;
  route: "mx" | "msa";
  at: number;
  /** 250 */
  accepted: boolean;
  /** the reply code, or the connection error */
  reply: string;
  /** how long the transaction took */
  ms: number;
}

let p: Pipeline | undefined;
let sink: SmtpPeer | undefined;
afterAll(async () => {
  await sink?.stop();
  await p?.stop();
});

describe("replicas of every service on a 3-node NATS cluster", () => {
  it("delivers every accepted message through a NATS node's crash and one crash of each service", async () => {
    sink = await startSmtpPeer({ host: "127.0.0.2", port: await freePort("127.0.0.2") });
    p = await startPipeline({
      services: [],
      natsCluster: true,
      dns: {
        "remote.test": { MX: [{ exchange: "mx.remote.test", priority: 10 }] },
        "mx.remote.test": { A: ["127.0.0.2"] },
      },
      env: {
        SMTP_REMOTE_PORT: String(sink.port),
        RETRY_SCHEDULE: "2s",
        RATE_MESSAGES_PER_HOUR: "100000",
        // a killed worker's requests come back sooner than the production defaults
        DELIVERY_ACK_WAIT: "10s",
        MDA_ACK_WAIT: "10s",
        DESTINATION_SLOT_LEASE: "5s",
        SHUTDOWN_TIMEOUT: "5s",
        LOG_LEVEL: "warn",
      },
    });
    const pipeline = p;
    // consecutive ports: each mx and msa replica has its own (see README, Scaling)
    const edgePorts = {
      mx: [pipeline.ports.mx, await freePort()],
      submission: [pipeline.ports.submission, await freePort()],
      submissions: [pipeline.ports.submissions, await freePort()],
    };
    const replicaEnv = (name: ServiceName, i: number): Record<string, string> =>
      name === "mx"
        ? { MX_PORT: String(edgePorts.mx[i]) }
        : name === "msa"
          ? {
              MSA_SUBMISSION_PORT: String(edgePorts.submission[i]),
              MSA_SUBMISSIONS_PORT: String(edgePorts.submissions[i]),
            }
          : {};
    const counts: Record<ServiceName, number> = { mx: 2, msa: 2, router: 2, mda: 2, delivery: 3 };
    const running = new Map<ServiceName, ServiceHandle[]>();
    await Promise.all(
      (Object.keys(counts) as ServiceName[]).map(async (name) => {
        const handles: ServiceHandle[] = [];
        for (let i = 0; i < counts[name]; i++) {
          handles.push(await pipeline.start(name, `${name}-${i + 1}`, replicaEnv(name, i)));
        }
        running.set(name, handles);
      }),
    );

    // the topology is R3 throughout: the spool, the work queues, the consumers
    const jsz = (await fetch(
      `${pipeline.cluster!.nodes[0]!.monitorUrl}/jsz?streams=true&consumers=true`,
    ).then((r) => r.json())) as {
      account_details?: {
        stream_detail?: {
          name: string;
          cluster?: { replicas?: unknown[] };
          consumer_detail?: { name: string }[];
        }[];
      }[];
    };
    const streams = jsz.account_details?.flatMap((a) => a.stream_detail ?? []) ?? [];
    for (const name of ["MAIL_SPOOL", "MAIL_DELIVER", "MAIL_STATUS", "MAIL_EVENTS", "OBJ_mail-bodies"]) {
      expect({
        name,
        peers: 1 + (streams.find((s) => s.name === name)?.cluster?.replicas?.length ?? -1),
      }).toEqual({
        name,
        peers: 3,
      });
    }

    // --- load ---------------------------------------------------------------------------------
    const transports = {
      mx: edgePorts.mx.map((port) =>
        nodemailer.createTransport({
          host: "127.0.0.1",
          port,
          tls: { rejectUnauthorized: false },
          connectionTimeout: 10_000,
          greetingTimeout: 10_000,
          socketTimeout: 40_000,
        } as TransportOptions),
      ),
      msa: edgePorts.submission.map((port) =>
        nodemailer.createTransport({
          host: "127.0.0.1",
          port,
          requireTLS: true,
          tls: { rejectUnauthorized: false },
          auth: { user: "alice@example.test", pass: "alice-dev-password" },
          connectionTimeout: 10_000,
          greetingTimeout: 10_000,
          socketTimeout: 40_000,
        } as TransportOptions),
      ),
    } satisfies Record<string, Transporter[]>;
    const attempts: Attempt[] = [];
    let fault: Fault = "none";
    let stopLoad = false;
    let seq = 0;
    const started = Date.now();
    const send = async (n: number): Promise<void> => {
      const route = n % 2 === 0 ? "mx" : "msa";
      const id = `<chaos-${n}@load.test>`;
      // inbound to alice and bob; submissions to the remote sink and, every fourth, to bob
      const to =
        route === "mx"
          ? n % 4 === 0
            ? "alice@example.test"
            : "bob@example.test"
          : n % 4 === 1
            ? "bob@example.test"
            : `user${n}@remote.test`;
      const from = route === "mx" ? "someone@elsewhere.test" : "alice@example.test";
      const transport = transports[route][Math.floor(n / 2) % 2]!;
      const attempt: Attempt = { id, fault, route, at: Date.now(), accepted: false, reply: "", ms: 0 };
      try {
        const info = await transport.sendMail({
          envelope: { from, to: [to] },
          raw: `From: <${from}>\r\nTo: <${to}>\r\nSubject: chaos ${n}\r\nMessage-ID: ${id}\r\nDate: ${new Date().toUTCString()}\r\n\r\nmessage ${n}\r\n`,
        });
        attempt.accepted = /^250[ -]/.test(info.response);
        attempt.reply = info.response.slice(0, 3);
      } catch (err) {
        const e = err as { responseCode?: number; code?: string; message: string };
        attempt.reply = e.responseCode ? String(e.responseCode) : (e.code ?? e.message);
      }
      attempt.ms = Date.now() - attempt.at;
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

    // --- faults -------------------------------------------------------------------------------
    const crashes: string[] = [];
    let natsRefusalWindow = "";
    try {
      await acceptedSince(20);

      fault = "nats node";
      const cluster = pipeline.cluster!;
      const spool = (await fetch(`${cluster.nodes[0]!.monitorUrl}/jsz?streams=true`).then((r) =>
        r.json(),
      )) as {
        account_details?: { stream_detail?: { name: string; cluster?: { leader?: string } }[] }[];
      };
      const leaderName =
        spool.account_details?.flatMap((a) => a.stream_detail ?? []).find((s) => s.name === "MAIL_SPOOL")
          ?.cluster?.leader ?? "n1";
      const node = cluster.nodes.find((n) => n.name === leaderName)!;
      const killedAt = Date.now();
      await node.kill();
      crashes.push(`nats-server ${node.name} (the spool's leader)`);
      await acceptedSince(20);
      await node.restart();
      await cluster.waitHealthy(60_000);
      await acceptedSince(10);
      const refused = attempts.filter((a) => a.fault === "nats node" && !a.accepted && a.at >= killedAt);
      const slowest = Math.max(
        ...attempts.filter((a) => a.fault === "nats node" && a.accepted).map((a) => a.ms),
      );
      natsRefusalWindow = `slowest 250 ${slowest} ms; `;
      natsRefusalWindow += refused.length
        ? `${refused.length} refused from ${refused[0]!.at - killedAt} ms to ${refused.at(-1)!.at - killedAt} ms after the kill (${[...new Set(refused.map((a) => a.reply))].join(", ")})`
        : "none refused";

      for (const name of ["router", "mx", "msa", "mda", "delivery"] as const) {
        fault = name;
        const handles = running.get(name)!;
        const victim = handles.shift()!;
        await victim.kill();
        crashes.push(`${name} pid ${victim.pid}`);
        await acceptedSince(5);
        const slot = [...pipeline.services.entries()].find(([, h]) => h === victim)![0];
        const fresh = await pipeline.start(
          name,
          `${slot}-new`,
          replicaEnv(name, Number(slot.split("-")[1]) - 1),
        );
        handles.push(fresh);
        await acceptedSince(10);
      }
    } finally {
      stopLoad = true;
      await Promise.all(clients);
    }

    // --- count --------------------------------------------------------------------------------
    const arrived = async () => [
      ...(await maildirIds(pipeline.maildirRoot)),
      ...sink!.messages.map((m) => messageId(m.raw)),
    ];
    const seen = await countArrivals(attempts, arrived);
    const { rows, table } = tally("fault", FAULTS, attempts, (a) => a.fault, seen);
    const duplicates = rows.flatMap((r) => r.duplicates);
    const refusedReplies = [...new Set(attempts.filter((a) => !a.accepted).map((a) => a.reply))];
    console.log(
      `${table}\n\ncrashes: ${crashes.join("; ")}\n` +
        `NATS node loss: ${natsRefusalWindow}\n` +
        `refusals: ${refusedReplies.join(", ") || "none"}\n` +
        `duplicates: ${duplicates.join(" ") || "none"}\n` +
        `lost: ${rows.flatMap((r) => r.lost).join(" ") || "none"}\n` +
        `${attempts.length} attempts in ${((Date.now() - started) / 1000).toFixed(0)} s`,
    );

    // a message that was never answered 250 may still arrive (the reply was lost); one that was must
    expect(rows.flatMap((r) => r.lost)).toEqual([]);
    expect(duplicates.length).toBeLessThanOrEqual(crashes.length);
    // a refusal is a 4xx or a lost connection, never a 5xx
    for (const reply of refusedReplies) expect(reply).not.toMatch(/^5/);
    for (const r of rows) expect(r.accepted, `messages accepted during "${r.group}"`).toBeGreaterThan(0);
  }, 300_000);
});
