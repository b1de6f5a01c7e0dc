// TLS_POLICY per destination: opportunistic, required (any certificate), verify (a certificate valid
// for the MX name, here from a test CA the worker trusts through OUTBOUND_TLS_CA_FILE).
import { writeFile } from "node:fs/promises";
import path from "node:path";
import type { Bus } from "@mailpipe/bus";
import {
  createTestCa,
  type NatsHandle,
  startNats,
  type TempDir,
  type TestCa,
  tempDir,
} from "@mailpipe/testing";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  collectEvents,
  collectStatuses,
  connectBus,
  message,
  mx,
  publishRequest,
  quietTelemetry,
  resetBus,
  startPeers,
  testConfig,
} from "../test/helpers.ts";
import { startDelivery } from "./service.ts";

let nats: NatsHandle;
let admin: Bus;
let ca: TestCa;
let dir: TempDir;
let caFile: string;
const cleanups: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  nats = await startNats();
  admin = await connectBus(nats.url);
  ca = await createTestCa();
  dir = await tempDir("delivery-tls");
  caFile = path.join(dir.path, "ca.pem");
  await writeFile(caFile, ca.cert);
}, 60_000);
afterAll(async () => {
  await admin?.close();
  await nats?.stop();
  await ca?.remove();
  await dir?.remove();
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  await resetBus(admin);
});

async function peers(...args: Parameters<typeof startPeers>) {
  const started = await startPeers(...args);
  cleanups.push(() => Promise.all(started.peers.map((p) => p.stop())));
  return started;
}

async function worker(port: number, env: Record<string, string>) {
  const telemetry = quietTelemetry();
  const bus = await connectBus(nats.url, telemetry);
  const delivery = await startDelivery({ config: testConfig(nats.url, port, env), bus, telemetry });
  cleanups.push(async () => {
    await delivery.stop();
    await bus.close();
  });
}

function watch() {
  const statuses = collectStatuses(admin);
  const events = collectEvents(admin);
  cleanups.push(async () => {
    await (await statuses).stop();
    await events.stop();
  });
  return { statuses, events };
}

describe("TLS_POLICY", () => {
  it("required: defers with 451 4.7.4 when the host offers no STARTTLS, and sends nothing in clear", async () => {
    const {
      port,
      peers: [plain],
    } = await peers(["127.0.0.2"]);
    await worker(port, { TLS_POLICY: "secure.test: required" });
    const { statuses, events } = watch();
    await publishRequest(admin, {
      domain: "secure.test",
      hosts: [mx("mx.secure.test", 10, "127.0.0.2")],
      recipients: ["bob@secure.test"],
      body: message("must be encrypted", "bob@secure.test"),
    });
    const [s] = await (await statuses).waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.4" } });
    expect(s!.status.reply.text).toMatch(
      /TLS is required \(required, TLS_POLICY secure\.test\).*mx\.secure\.test/,
    );
    expect(plain!.messages).toHaveLength(0);
    const e = await events.waitFor("deferred", "bob@secure.test");
    expect(e.tls).toMatchObject({ policy: "required", source: "config" });
  });

  it("required: delivers over TLS with a self-signed certificate; the event has the policy, version and cipher the server saw", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"], () => ({ starttls: true }));
    await worker(port, { TLS_POLICY: '{"mx:*.secure.test": "required"}' });
    const { events } = watch();
    await publishRequest(admin, {
      domain: "secure.test",
      hosts: [mx("mx1.secure.test", 10, "127.0.0.2")],
      recipients: ["bob@secure.test"],
      body: message("encrypted", "bob@secure.test"),
    });
    const [got] = await peer!.waitForMessages(1);
    expect(got!.tls).toBe(true);
    const e = await events.waitFor("delivered", "bob@secure.test");
    expect(e.tls).toEqual({
      policy: "required",
      source: "config",
      version: got!.tlsVersion,
      cipher: got!.tlsCipher,
      verified: false,
    });
    expect(e.tls?.version).toMatch(/^TLSv1\.[23]$/);
  });

  it("verify: refuses a self-signed certificate with 451 4.7.5 and never retries in plaintext", async () => {
    const {
      port,
      peers: [peer],
    } = await peers(["127.0.0.2"], () => ({ starttls: true }));
    await worker(port, { TLS_POLICY: "secure.test: verify", OUTBOUND_TLS_CA_FILE: caFile });
    const { statuses } = watch();
    await publishRequest(admin, {
      domain: "secure.test",
      hosts: [mx("mx.secure.test", 10, "127.0.0.2")],
      recipients: ["bob@secure.test"],
      body: message("verify", "bob@secure.test"),
    });
    const [s] = await (await statuses).waitFor(1);
    expect(s!.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(s!.status.reply.text).toMatch(/not verified \(verify, TLS_POLICY secure\.test\)/);
    expect(peer!.connections).toBe(1);
    expect(peer!.messages).toHaveLength(0);
  });

  it("verify: delivers to a host whose certificate the configured CA issued for the MX name, and refuses one issued for another name", async () => {
    const good = await ca.issue(["mx.secure.test"]);
    const wrong = await ca.issue(["other.example.test"]);
    const {
      port,
      peers: [ok, mismatch],
    } = await peers(["127.0.0.2", "127.0.0.3"], (host) => ({
      certificate: host === "127.0.0.2" ? good : wrong,
    }));
    await worker(port, {
      TLS_POLICY: "secure.test: verify\nmismatch.test: verify",
      OUTBOUND_TLS_CA_FILE: caFile,
    });
    const { statuses, events } = watch();
    await publishRequest(admin, {
      domain: "secure.test",
      hosts: [mx("mx.secure.test", 10, "127.0.0.2")],
      recipients: ["bob@secure.test"],
      body: message("verified", "bob@secure.test"),
    });
    await publishRequest(admin, {
      domain: "mismatch.test",
      hosts: [mx("mx.secure.test", 10, "127.0.0.3")],
      recipients: ["bob@mismatch.test"],
      body: message("wrong name", "bob@mismatch.test"),
    });
    const [got] = await ok!.waitForMessages(1);
    expect(got!.tls).toBe(true);
    const e = await events.waitFor("delivered", "bob@secure.test");
    expect(e.tls).toMatchObject({
      policy: "verify",
      source: "config",
      verified: true,
      cipher: got!.tlsCipher,
    });
    const all = await (await statuses).waitFor(2);
    const refused = all.find((x) => x.status.recipient === "bob@mismatch.test");
    expect(refused!.status).toMatchObject({ outcome: "deferred", reply: { code: 451, enhanced: "4.7.5" } });
    expect(refused!.status.reply.text).toMatch(/ALTNAME|altname|host/i);
    expect(mismatch!.messages).toHaveLength(0);
  });

  it("leaves other destinations opportunistic: plaintext to a host without STARTTLS is delivered", async () => {
    const {
      port,
      peers: [plain],
    } = await peers(["127.0.0.2"]);
    await worker(port, { TLS_POLICY: "secure.test: verify" });
    const { events } = watch();
    await publishRequest(admin, {
      domain: "remote.test",
      hosts: [mx("mx.remote.test", 10, "127.0.0.2")],
      recipients: ["bob@remote.test"],
      body: message("plain"),
    });
    const [got] = await plain!.waitForMessages(1);
    expect(got!.tls).toBe(false);
    const e = await events.waitFor("delivered", "bob@remote.test");
    expect(e.tls).toEqual({ policy: "opportunistic", source: "default" });
  });

  it("stops at start on a TLS_POLICY entry it cannot read, naming it", () => {
    expect(() => testConfig(nats.url, 25, { TLS_POLICY: "secure.test: encrypted" })).toThrow(
      /secure\.test.*not a level/,
    );
  });
});
