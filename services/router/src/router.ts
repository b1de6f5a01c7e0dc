import type { Bus, Handler } from "@mailpipe/bus";
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

/**
 * With REDIS_WAIT_REPLICAS, a handler's Redis writes must reach that many replicas (WAIT) before
 * the bus acks: Redis replication is asynchronous, and a Sentinel failover would otherwise lose
 * writes the old master acked but had not passed on (a message's state, a scheduled retry). WAIT
 * covers every write sent before it on the connection. Short of the replicas, the handler fails and
 * the message is redelivered; the writes are idempotent.
 */
export function waitForReplicas(redis: Redis, replicas: number, timeoutMs: number) {
  return <T>(handler: Handler<T>): Handler<T> => {
    if (replicas === 0) return handler;
    return async (message, hctx) => {
      const outcome = await handler(message, hctx);
      const got = await redis.wait(replicas, timeoutMs);
      if (got < replicas) {
        throw new Error(
          `${got} of ${replicas} Redis replicas (REDIS_WAIT_REPLICAS) have the router's writes after ` +
            `${timeoutMs} ms; handled again later: check the replicas' link to the master (INFO replication)`,
        );
      }
      return outcome;
    };
  };
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
  const replicated = waitForReplicas(opts.redis, config.REDIS_WAIT_REPLICAS, config.REDIS_WAIT_TIMEOUT);
  const route = replicated(createRouteHandler(ctx));
  const status = replicated(createStatusHandler(ctx));
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
  const statuses = await bus.consume("routerStatus", RecipientStatus, status, consumeOpts);
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
