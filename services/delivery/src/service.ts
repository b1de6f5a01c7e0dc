import type { Bus } from "@mailpipe/bus";
import { RemoteDeliveryRequest } from "@mailpipe/contracts";
import { DestinationSlots } from "@mailpipe/queue";
import type { Telemetry } from "@mailpipe/telemetry";
import type { Redis } from "ioredis";
import type { Config } from "./config.ts";
import { createWorker, type DeliveryWorker } from "./worker.ts";

/** A handler's heartbeat stops after this long, so a transaction stuck beyond every timer is redelivered. */
const HEARTBEAT_FOR_MS = 60 * 60_000;

export interface RunningDelivery {
  worker: DeliveryWorker;
  /** stops taking requests, finishes the transactions in flight, then QUITs pooled sessions */
  stop(): Promise<void>;
}

/** Binds the shared "delivery" consumer; main.ts runs this inside runService, tests call it directly. */
export async function startDelivery({
  config,
  bus,
  telemetry,
  workerId,
  redis,
}: {
  config: Config;
  bus: Bus;
  telemetry: Telemetry;
  workerId?: string;
  /** where the router keeps the destination slots (the worker renews and checks them) */
  redis?: Redis | undefined;
}): Promise<RunningDelivery> {
  const worker = createWorker({
    config,
    bus,
    bodies: await bus.bodies(),
    ...(redis ? { slots: new DestinationSlots(redis) } : {}),
    telemetry,
    ...(workerId ? { workerId } : {}),
  });
  const sub = await bus.consume("delivery", RemoteDeliveryRequest, worker.handle, {
    maxInFlight: config.DELIVERY_CONCURRENCY,
    ackWaitMs: config.DELIVERY_ACK_WAIT,
    heartbeatForMs: HEARTBEAT_FOR_MS,
  });
  telemetry.log.info(
    {
      worker: worker.workerId,
      concurrency: config.DELIVERY_CONCURRENCY,
      port: config.SMTP_REMOTE_PORT,
    },
    "consuming delivery requests",
  );
  const obsolete = ["DESTINATION_CONCURRENCY", "DESTINATION_WAIT"].filter(
    (n) => process.env[n] !== undefined,
  );
  if (obsolete.length > 0) {
    telemetry.log.warn(
      { variables: obsolete },
      "no longer read: destination limits are cluster-wide now, set on the router (DESTINATION_CONNECTIONS, DESTINATION_RATE, DESTINATION_LIMITS)",
    );
  }
  if (!redis) {
    telemetry.log.warn("no Redis: destination slots are neither checked nor renewed by this worker");
  }
  if (!config.SMTP_BLOCK_LOCAL_ADDRESSES) {
    telemetry.log.warn(
      "SMTP_BLOCK_LOCAL_ADDRESSES=false: MX records may point this worker at internal hosts",
    );
  }
  return {
    worker,
    async stop() {
      await sub.stop();
      await worker.close();
    },
  };
}
