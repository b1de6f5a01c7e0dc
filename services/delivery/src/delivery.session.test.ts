// The SMTP dialogue itself: MAIL FROM parameters, timers, the pool's limits, address policy, and
// what happens when the body cannot be read mid-transaction.
import type { Bus } from "@mailpipe/bus";
import type { RemoteDeliveryRequest } from "@mailpipe/contracts";
import { RemoteDeliveryRequest as RequestSchema, subjects } from "@mailpipe/contracts";
import { type NatsHandle, startNats } from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  collectStatuses,
  connectBus,
  message,
  mx,
  publishRequest,
  quietTelemetry,
  type RawServer,
  rawSmtpServer,
  resetBus,
  startPeers,
  testConfig,
} from "../test/helpers.ts";
import { FRESH_SESSION_MS } from "./connector.ts";
import { startDelivery } from "./service.ts";

let nats: NatsHandle;
let admin: Bus;
const cleanups: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  nats = await startNats();
  admin = await connectBus(nats.url);
});
afterAll(async () => {
  await admin?.close();
  await nats?.stop();
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  await resetBus(admin);
});

async function worker(port: number, env: Record<string, string> = {}) {
  const telemetry = quietTelemetry();
  const bus = await connectBus(nats.url, telemetry);
  const delivery = await startDelivery({ config: testConfig(nats.url, port, env), bus, telemetry });
  cleanups.push(async () => {
    await delivery.stop();
    await bus.close();
  });
  return delivery;
}

async function statuses() {
  const c = await collectStatuses(admin);
  cleanups.push(() => c.stop());
  return c;
}

async function peers(hosts: string[], options?: Parameters<typeof startPeers>[1]) {
  const started = await startPeers(hosts, options);
  cleanups.push(() => Promise.all(started.peers.map((p) => p.stop())));
  return started;
}

const mailFromLines = (raw: RawServer) => raw.sessions.flat().filter((l) => l.startsWith("MAIL FROM"));

describe("reusing sessions", () => {
  it("sends the next message on a session it just used without RSET, and RSETs one idle longer than a second", async () => {
    const raw = await rawSmtpServer("127.0.0.2");
    cleanups.push(() => raw.stop());
    await worker(raw.port);
    const seen = await statuses();
    const hosts = [mx("mx1.remote.test", 10, "127.0.0.2")];
    const send = (to: string) =>
      publishRequest(admin, { domain: "remote.test", hosts, recipients: [to], body: message(to) });
    await send("a@remote.test");
    await seen.waitFor(1);
    await send("b@remote.test");
    await seen.waitFor(2);
    await new Promise((r) => setTimeout(r, FRESH_SESSION_MS + 300));
    await send("c@remote.test");
    const all = await seen.waitFor(3);
    expect(all.map((s) => s.status.outcome)).toEqual(["delivered", "delivered", "delivered"]);
    expect(raw.sessions).toHaveLength(1);
    const commands = raw.sessions[0]!.map((l) => l.split(/[ :]/)[0]);
    // a, then b straight away, then c after a RSET
    expect(commands.filter((c) => c === "MAIL")).toHaveLength(3);
    expect(commands.filter((c) => c === "RSET")).toHaveLength(1);
    expect(commands.lastIndexOf("RSET")).toBeGreaterThan(
      commands.indexOf("MAIL", commands.indexOf("MAIL") + 1),
    );
  });

  it("sends the message on a new connection when the reused session turns out closed at MAIL", async () => {
    const raw = await rawSmtpServer("127.0.0.2", { closeAfterMessages: 1 });
    cleanups.push(() => raw.stop());
    await worker(raw.port);
    const seen = await statuses();
    const hosts = [mx("mx1.remote.test", 10, "127.0.0.2")];
    await publishRequest(admin, {
      domain: "remote.test",
      hosts,
      recipients: ["a@remote.test"],
      body: message("1"),
    });
    await seen.waitFor(1);
    await publishRequest(admin, {
      domain: "remote.test",
      hosts,
      recipients: ["b@remote.test"],
      body: message("2"),
    });
    const [, second] = await seen.waitFor(2);
    // the closed session cost nothing: delivered on the first attempt, over a second connection
    expect(second!.status).toMatchObject({ recipient: "b@remote.test", outcome: "delivered", attempt: 1 });
    expect(raw.messages).toHaveLength(2);
    expect(raw.sessions.length).toBeGreaterThanOrEqual(2);
  });
});

describe("the SMTP dialogue", () => {
  it("adds BODY=8BITMIME and SMTPUTF8 only when the message needs them and the server offers them", async () => {
    const offers = await rawSmtpServer("127.0.0.2", {
      extensions: ["PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 10000000"],
    });
    cleanups.push(() => offers.stop());
    await worker(offers.port);
    const seen = await statuses();
    const hosts = [mx("mx1.remote.test", 10, "127.0.0.2")];
    await publishRequest(admin, {
      domain: "remote.test",
      hosts,
      recipients: ["a@remote.test"],
      body: message("plain"),
    });
    await publishRequest(admin, {
      domain: "remote.test",
      hosts,
      recipients: ["b@remote.test"],
      body: message("8bit"),
      bodyType: "8BITMIME",
      smtputf8: true,
    });
    await seen.waitFor(2);
    const [plain, eightBit] = mailFromLines(offers);
    expect(plain).toMatch(/^MAIL FROM:<alice@sender\.test> SIZE=\d+$/);
    expect(eightBit).toContain("BODY=8BITMIME");
    expect(eightBit).toMatch(/ SMTPUTF8( |$)/);
  });

  it("leaves BODY=8BITMIME out when the server does not offer 8BITMIME (nor PIPELINING)", async () => {
    const bare = await rawSmtpServer("127.0.0.2", { extensions: [] });
    cleanups.push(() => bare.stop());
    await worker(bare.port);
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["a@remote.test"],
      body: message("8bit to 7bit server"),
      bodyType: "8BITMIME",
    });
    const [s] = await seen.waitFor(1);
    expect(s!.status.outcome).toBe("delivered");
    expect(mailFromLines(bare)).toEqual(["MAIL FROM:<alice@sender.test>"]);
  });

  it("bounces with 553 5.6.7 when SMTPUTF8 is needed and no host offers it", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"], () => ({
      smtpOptions: { hideSMTPUTF8: true },
    }));
    await worker(port);
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["jörg@remote.test"],
      body: message("utf8"),
    });
    const [s] = await seen.waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "bounced", reply: { code: 553, enhanced: "5.6.7" } });
    expect(peer!.transactions).toBe(0);
  });

  it("gives up on a greeting that never comes after SMTP_GREETING_TIMEOUT and uses the next MX", async () => {
    const {
      port,
      peers: [mx1, mx2],
    } = await peers(["127.0.0.2", "127.0.0.3"], (host) =>
      host === "127.0.0.2" ? { script: { connect: { hang: true } } } : {},
    );
    await worker(port, { SMTP_GREETING_TIMEOUT: "700ms" });
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2"), mx("mx2.remote.test", 20, "127.0.0.3")],
      recipients: ["bob@remote.test"],
      body: message("slow greeting"),
    });
    const [s] = await seen.waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "delivered", remoteMta: "mx2.remote.test [127.0.0.3]" });
    expect(mx1!.connections).toBe(1);
    expect(mx2!.messages).toHaveLength(1);
  });

  it("defers with 4.4.2 when the reply to the end of data never comes", async () => {
    const { port } = await peers(["127.0.0.2"], () => ({ script: { data: { hang: true } } }));
    await worker(port, { SMTP_DATA_DONE_TIMEOUT: "700ms" });
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test"],
      body: message("hang at the dot"),
    });
    const [s] = await seen.waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.4.2" } });
    expect(s!.status.reply.text).toMatch(/end of data/);
  });

  it("closes a connection after SMTP_MAX_MESSAGES_PER_CONNECTION messages", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"]);
    await worker(port, { SMTP_MAX_MESSAGES_PER_CONNECTION: "3", DELIVERY_CONCURRENCY: "1" });
    const seen = await statuses();
    for (let i = 0; i < 9; i++) {
      await publishRequest(admin, {
        domain: "remote.test",
        hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
        recipients: [`u${i}@remote.test`],
        body: message(`m${i}`),
      });
    }
    await seen.waitFor(9);
    expect(peer!.messages).toHaveLength(9);
    expect(peer!.connections).toBe(3);
  });

  it("opens a new connection per message when SMTP_REUSE_CONNECTIONS=false", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"]);
    await worker(port, { SMTP_REUSE_CONNECTIONS: "false", DELIVERY_CONCURRENCY: "1" });
    const seen = await statuses();
    for (let i = 0; i < 3; i++) {
      await publishRequest(admin, {
        domain: "remote.test",
        hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
        recipients: [`u${i}@remote.test`],
        body: message(`m${i}`),
      });
    }
    await seen.waitFor(3);
    expect(peer!.connections).toBe(3);
  });

  it("does not keep a session past SMTP_IDLE_CONNECTION_TIMEOUT", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"]);
    const delivery = await worker(port, { SMTP_IDLE_CONNECTION_TIMEOUT: "300ms" });
    const seen = await statuses();
    const send = (i: number) =>
      publishRequest(admin, {
        domain: "remote.test",
        hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
        recipients: [`u${i}@remote.test`],
        body: message(`m${i}`),
      });
    await send(0);
    await seen.waitFor(1);
    expect(delivery.worker.connector.pool.idleCount).toBe(1);
    await new Promise((r) => setTimeout(r, 800));
    expect(delivery.worker.connector.pool.idleCount).toBe(0);
    await send(1);
    await seen.waitFor(2);
    expect(peer!.connections).toBe(2);
  });

  it("refuses loopback MX addresses when SMTP_BLOCK_LOCAL_ADDRESSES=true and bounces with 5.4.4", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"]);
    await worker(port, { SMTP_BLOCK_LOCAL_ADDRESSES: "true" });
    const seen = await statuses();
    await publishRequest(admin, {
      domain: "parked.test",
      hosts: [mx("localhost", 0, "127.0.0.2")],
      recipients: ["bob@parked.test"],
      body: message("to localhost"),
    });
    const [s] = await seen.waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "bounced", reply: { code: 550, enhanced: "5.4.4" } });
    expect(peer!.connections).toBe(0);
  });

  it("never completes DATA with a body that fails its integrity check, and defers", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"]);
    await worker(port);
    const seen = await statuses();
    // a stored body whose reference carries the wrong sha256: the mismatch shows at its last byte
    const good = await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx1.remote.test", 10, "127.0.0.2")],
      recipients: ["first@remote.test"],
      body: message("good"),
    });
    await seen.waitFor(1);
    const bad: RemoteDeliveryRequest = {
      ...good,
      dispatchId: `${good.dispatchId}.bad`,
      recipients: [{ address: "second@remote.test", attempt: 1 }],
      body: { ...good.body, sha256: "0".repeat(64) },
    };
    await admin.publish(subjects.deliverRemote("remote.test"), RequestSchema, bad, { msgId: bad.dispatchId });
    const [, s] = await seen.waitFor(2);
    expect(s!.status).toMatchObject({
      recipient: "second@remote.test",
      outcome: "deferred",
      reply: { code: 451, enhanced: "4.3.0" },
    });
    await new Promise((r) => setTimeout(r, 300));
    expect(peer!.messages.map((m) => m.rcptTo)).toEqual([["first@remote.test"]]);
  });
});
