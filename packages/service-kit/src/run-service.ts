import { Bus, type TopologySettings } from "@mailpipe/bus";
import type { ServiceName } from "@mailpipe/contracts";
import { createTelemetry, type Logger, type Metrics, type Telemetry, type Tracer } from "@mailpipe/telemetry";
import type { Redis } from "ioredis";
import type { z } from "zod";
import { type BaseConfig, ConfigError, parseConfig, redactConfig } from "./config.ts";
import { startHealthServer } from "./http.ts";
import { createRedis } from "./redis.ts";

export interface ServiceContext<C extends BaseConfig> {
  name: ServiceName;
  config: C;
  telemetry: Telemetry;
  log: Logger;
  tracer: Tracer;
  metrics: Metrics;
  bus: Bus;
  /** present when the service asked for Redis */
  redis: Redis | undefined;
  /** aborted when shutdown begins: stop taking new work */
  signal: AbortSignal;
  /** adds a readiness condition to /readyz */
  readiness(name: string, check: () => boolean): void;
}

/** Stops intake and finishes in-flight work; called once on SIGTERM/SIGINT. */
export type StopFn = () => Promise<void>;

export interface ServiceDefinition<S extends z.ZodType<BaseConfig>> {
  name: ServiceName;
  config: S;
  redis?: boolean;
  start(ctx: ServiceContext<z.infer<S>>): Promise<StopFn>;
}

export interface RunningService {
  stop(reason?: string): Promise<void>;
  /** resolves when the service has stopped */
  done: Promise<void>;
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const onAbort = () => {
      clearTimeout(t);
      resolve();
    };
    const t = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * The one way a service starts: config (fail fast), telemetry, health server, NATS (and Redis),
 * streams, then the service's own start(); SIGTERM/SIGINT stop intake, finish in-flight work,
 * drain and flush within SHUTDOWN_TIMEOUT, then exit 0 (1 if it had to be cut short).
 */
export async function runService<S extends z.ZodType<BaseConfig>>(
  def: ServiceDefinition<S>,
  { env = process.env, exit = true }: { env?: NodeJS.ProcessEnv; exit?: boolean } = {},
): Promise<RunningService> {
  let config: z.infer<S>;
  try {
    config = parseConfig(def.config, env);
  } catch (err) {
    if (err instanceof ConfigError && exit) {
      process.stderr.write(`${def.name}: ${err.message}\n`);
      process.exit(78); // EX_CONFIG
    }
    throw err;
  }

  const telemetry = createTelemetry({ service: def.name, logLevel: config.LOG_LEVEL, env });
  const { log } = telemetry;
  log.info({ config: redactConfig(config as Record<string, unknown>) }, `${def.name} starting`);

  const abort = new AbortController();
  const checks = new Map<string, () => boolean>();
  let started = false;
  let stopping = false;
  const readiness = () => {
    const results: Record<string, boolean> = {};
    for (const [name, check] of checks) results[name] = check();
    return { ready: started && !stopping && Object.values(results).every(Boolean), checks: results };
  };
  const health = await startHealthServer(config.HTTP_HOST, config.HTTP_PORT, readiness, telemetry.metrics);
  log.info({ host: config.HTTP_HOST, port: health.port }, "health and metrics endpoint listening");

  let bus: Bus | undefined;
  let redis: Redis | undefined;
  let stopFn: StopFn | undefined;
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => {
    resolveDone = r;
  });

  const shutdown = async (reason: string): Promise<void> => {
    if (stopping) return done;
    stopping = true;
    abort.abort();
    const timeoutMs = config.SHUTDOWN_TIMEOUT;
    log.info({ reason, timeoutMs }, `${def.name} stopping`);
    const hard = setTimeout(() => {
      log.error(
        { timeoutMs },
        "shutdown did not finish within SHUTDOWN_TIMEOUT; exiting with work unfinished (it will be redelivered)",
      );
      if (exit) process.exit(1);
    }, timeoutMs);
    hard.unref();
    try {
      if (stopFn) await stopFn();
      if (bus) await bus.close();
      if (redis) await redis.quit().catch(() => redis?.disconnect());
      await health.close();
      log.info(`${def.name} stopped`);
      await telemetry.shutdown();
    } catch (err) {
      log.error({ err }, "error during shutdown");
    } finally {
      clearTimeout(hard);
      resolveDone();
    }
    if (exit) process.exit(0);
  };

  if (exit) {
    for (const sig of ["SIGTERM", "SIGINT"] as const) process.once(sig, () => void shutdown(sig));
  }

  // NATS: keep trying until it answers, saying clearly what is wrong, so the pod stays unready
  // instead of crash-looping while NATS starts.
  for (let attempt = 1; !abort.signal.aborted; attempt++) {
    try {
      bus = await Bus.connect({
        url: config.NATS_URL,
        name: `${def.name}@${config.MAIL_HOSTNAME}`,
        telemetry,
        topology: {
          replicas: config.JS_REPLICAS,
          eventsMaxAgeMs: config.EVENTS_MAX_AGE,
          bodyTtlMs: config.BODY_TTL,
        } satisfies Partial<TopologySettings>,
      });
      await bus.ensureTopology();
      break;
    } catch (err) {
      await bus?.close().catch(() => {});
      bus = undefined;
      log.error({ attempt, err: (err as Error).message }, "NATS is not available yet; retrying");
      await sleep(Math.min(250 * attempt, 3000), abort.signal);
    }
  }
  if (!bus) {
    await shutdown("stopped before NATS was reachable");
    return { stop: async () => {}, done };
  }
  const connectedBus = bus;
  checks.set("nats", () => connectedBus.connected);

  if (def.redis) {
    const r = createRedis(config);
    r.on("error", (err) => log.warn({ err: err.message }, "Redis connection error"));
    r.on("ready", () => log.info("connected to Redis"));
    redis = r;
    for (let attempt = 1; !abort.signal.aborted; attempt++) {
      try {
        await r.connect();
        break;
      } catch (err) {
        log.error(
          { attempt, err: (err as Error).message, url: redactConfig({ u: config.REDIS_URL }).u },
          "Redis is not available yet; retrying",
        );
        if (r.status !== "wait" && r.status !== "end") r.disconnect();
        await sleep(Math.min(250 * attempt, 3000), abort.signal);
      }
    }
    checks.set("redis", () => r.status === "ready");
  }

  if (abort.signal.aborted) return { stop: () => shutdown("stop"), done };
  try {
    stopFn = await def.start({
      name: def.name,
      config,
      telemetry,
      log,
      tracer: telemetry.tracer,
      metrics: telemetry.metrics,
      bus: connectedBus,
      redis,
      signal: abort.signal,
      readiness: (name, check) => checks.set(name, check),
    });
  } catch (err) {
    log.fatal({ err }, `${def.name} failed to start`);
    await shutdown("start failed");
    if (exit) process.exit(1);
    throw err;
  }
  started = true;
  log.info({ httpPort: health.port }, `${def.name} ready`);
  return { stop: (reason = "stop") => shutdown(reason), done };
}
