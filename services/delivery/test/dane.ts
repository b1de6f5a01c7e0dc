// DANE test support, shared by delivery.dane.test.ts (the loopback DNS server plays a validating
// resolver) and delivery.dane-dnssec.test.ts (a real unbound validates signed zones): TLSA records of
// a certificate, and a delivery service with DANE=on in front of SMTP peers on loopback.
import { createHash, X509Certificate } from "node:crypto";
import type { Bus } from "@mailpipe/bus";
import type { CertPair } from "@mailpipe/testing";
import { startDelivery } from "../src/service.ts";
import {
  collectEvents,
  collectStatuses,
  connectBus,
  quietTelemetry,
  startPeers,
  testConfig,
} from "./helpers.ts";

export interface Tlsa {
  usage: number;
  selector: number;
  matchingType: number;
  data: Buffer;
}

/** TLSA 3 1 1: SHA-256 of the certificate's public key (DANE-EE, SPKI). */
export function daneEe(pair: CertPair): Tlsa {
  const spki = new X509Certificate(pair.cert).publicKey.export({ type: "spki", format: "der" });
  return { usage: 3, selector: 1, matchingType: 1, data: createHash("sha256").update(spki).digest() };
}

/** TLSA 2 0 1: SHA-256 of the whole CA certificate (DANE-TA). */
export function daneTa(caPem: string): Tlsa {
  return {
    usage: 2,
    selector: 0,
    matchingType: 1,
    data: createHash("sha256").update(new X509Certificate(caPem).raw).digest(),
  };
}

/** The record as a zone-file line: `<owner> TLSA 3 1 1 <hex>`. */
export function tlsaLine(owner: string, r: Tlsa): string {
  return `${owner} TLSA ${r.usage} ${r.selector} ${r.matchingType} ${r.data.toString("hex")}`;
}

export interface DaneHarness {
  natsUrl: string;
  /** the test's own bus connection, which reads statuses and events */
  admin: Bus;
  /** run (in reverse) after each test */
  cleanups: (() => Promise<unknown>)[];
}

/**
 * SMTP peers on `hosts` (one port), then the resolvers DANE_RESOLVERS names, from `resolvers(port)`
 * (TLSA records live at `_<port>._tcp.<mx host>`), then delivery with DANE=on; statuses and events
 * are collected from then on. Everything is stopped by the harness's cleanups.
 */
export async function startDaneDelivery(
  h: DaneHarness,
  hosts: string[],
  options: Parameters<typeof startPeers>[1],
  resolvers: (port: number) => string | Promise<string>,
) {
  const started = await startPeers(hosts, options);
  h.cleanups.push(() => Promise.all(started.peers.map((p) => p.stop())));
  const DANE_RESOLVERS = await resolvers(started.port);
  const telemetry = quietTelemetry();
  const bus = await connectBus(h.natsUrl, telemetry);
  const config = testConfig(h.natsUrl, started.port, { DANE: "on", DANE_RESOLVERS });
  const delivery = await startDelivery({ config, bus, telemetry });
  h.cleanups.push(async () => {
    await delivery.stop();
    await bus.close();
  });
  const statuses = await collectStatuses(h.admin);
  const events = collectEvents(h.admin);
  h.cleanups.push(async () => {
    await statuses.stop();
    await events.stop();
  });
  return { ...started, statuses, events };
}
