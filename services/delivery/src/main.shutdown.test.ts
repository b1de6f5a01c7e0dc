// SIGTERM: the transaction in flight finishes and is reported, then pooled sessions get QUIT.
import type { Bus } from "@mailpipe/bus";
import {
  type NatsHandle,
  type ServerHandle,
  startNats,
  startRedis,
  startService,
  waitFor,
} from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { collectStatuses, connectBus, message, mx, publishRequest, rawSmtpServer } from "../test/helpers.ts";

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
});

describe("delivery shutdown", () => {
  it("finishes the transaction in flight, reports it, QUITs pooled sessions and exits 0", async () => {
    const raw = await rawSmtpServer("127.0.0.2", { dataReplyDelayMs: 1500 });
    cleanups.push(() => raw.stop());
    const svc = await startService("delivery", {
      env: {
        NATS_URL: nats.url,
        REDIS_URL: redis.url,
        MAIL_HOSTNAME: "out.sender.test",
        SMTP_REMOTE_PORT: String(raw.port),
        SMTP_BLOCK_LOCAL_ADDRESSES: "false",
        SHUTDOWN_TIMEOUT: "10s",
      },
    });
    cleanups.push(() => svc.kill());
    const seen = await collectStatuses(admin);
    cleanups.push(() => seen.stop());
    const hosts = [mx("mx.remote.test", 10, "127.0.0.2")];

    // one delivered and pooled, then one held at the end of data while SIGTERM arrives
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
    await waitFor(() => raw.messages.length === 2, { message: "second message not sent" });
    const code = await svc.stop("SIGTERM");

    expect(code).toBe(0);
    const [, second] = await seen.waitFor(2);
    expect(second!.status).toMatchObject({ recipient: "b@remote.test", outcome: "delivered" });
    expect(raw.sessions).toHaveLength(1);
    expect(raw.sessions[0]!.at(-1)).toBe("QUIT");
    // the second message took the session its first had just used: no RSET needed in between
    expect(raw.sessions[0]!.filter((l) => l.startsWith("MAIL FROM"))).toHaveLength(2);
    expect(raw.sessions[0]!.filter((l) => l === "RSET")).toHaveLength(0);
    await waitFor(() => raw.open === 0, { message: "connection still open" });
  });
});
