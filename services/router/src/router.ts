import type { Bus } from "@mailpipe/bus";
import { QueuedMail, RecipientStatus, topology } from "@mailpipe/contracts";
import type { Directory } from "@mailpipe/directory";
import type { DnsResolver } from "@mailpipe/dns";
import { MailQueue } from "@mailpipe/queue";
import type { Telemetry } from "@mailpipe/telemetry";
import type { Redis } from "ioredis";
import { type Admission, createAdmission } from "./admission.ts";
import type { Config } from "./config.ts";
import type { RouterContext } from "./deps.ts";
import { createHoldCache } from "./holds.ts";
import { routerMetrics } from "./metrics.ts";
import { createRouteHandler } from "./route.ts";
import { type Scheduler, startScheduler } from "./scheduler.ts";
import { createStatusHandler } from "./status.ts";

export interface RouterOptions {
  config: Config;
  telemetry: Telemetry;
  bus: Bus;
  redis: Redis;
  directory: () => Directory;
  resolver: DnsResolver;
  /** the clock (tests) */
  now?: () => number;
}

export interface Router {
  readonly queue: MailQueue;
  readonly admission: Admission;
  readonly scheduler: Scheduler;
  /** stops taking messages and running the schedule; waits for work in progress */
  stop(): Promise<void>;
}

/** Binds the router's two consumers and starts its scheduler. */
export async function startRouter(opts: RouterOptions): Promise<Router> {
  const { config, telemetry, bus } = opts;
  const queue = new MailQueue(opts.redis, { dsnBatchDelayMs: config.DSN_BATCH_DELAY });
  const base = {
    config,
    telemetry,
    bus,
    bodies: await bus.bodies(),
    queue,
    directory: opts.directory,
    resolver: opts.resolver,
    metrics: routerMetrics(telemetry.metrics, queue, telemetry.log),
    policy: {
      schedule: config.RETRY_SCHEDULE,
      jitter: config.RETRY_JITTER,
      lifetimeMs: config.QUEUE_LIFETIME,
      delayWarningMs: config.DELAY_WARNING,
    },
    now: opts.now ?? Date.now,
  };
  const holds = createHoldCache(queue, telemetry.log);
  await holds.start();
  const ctx: RouterContext = { ...base, holds, admission: createAdmission({ ...base, holds }, opts.redis) };
  const consumeOpts = { maxInFlight: config.ROUTER_CONCURRENCY };
  const route = createRouteHandler(ctx);
  const queued = await bus.consume("router", QueuedMail, route, consumeOpts);
  // after an upgrade: route what the pre-spool work queue still holds, until it is empty
  const legacy = (await bus.streamExists(topology.legacyQueued.name))
    ? await bus.consume("routerLegacy", QueuedMail, route, consumeOpts)
    : undefined;
  if (legacy) {
    telemetry.log.warn(
      { stream: topology.legacyQueued.name },
      "routing what the pre-spool work queue still holds; delete the stream once it is empty (nats stream rm)",
    );
  }
  const statuses = await bus.consume("routerStatus", RecipientStatus, createStatusHandler(ctx), consumeOpts);
  const scheduler = startScheduler(ctx);
  ctx.admission.start(() => scheduler.kick());
  return {
    queue,
    scheduler,
    admission: ctx.admission,
    async stop() {
      await Promise.all([
        queued.stop(),
        legacy?.stop(),
        statuses.stop(),
        scheduler.stop(),
        ctx.admission.stop(),
      ]);
      holds.stop();
    },
  };
}
