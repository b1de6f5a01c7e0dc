import type { DestinationStream } from "pino";
import { createLogger, type Logger } from "./logger.ts";
import { Metrics } from "./metrics.ts";
import { createTracing, type SpanExporter, type Tracer, type Tracing } from "./tracing.ts";

export interface TelemetryOptions {
  service: string;
  version?: string;
  logLevel?: string;
  logDestination?: DestinationStream;
  /** test exporter for spans */
  spanExporter?: SpanExporter;
  otlpEndpoint?: string;
  defaultMetrics?: boolean;
  env?: NodeJS.ProcessEnv;
}

/** Logs, traces and metrics of one service, created once at start. */
export interface Telemetry {
  service: string;
  log: Logger;
  tracer: Tracer;
  tracing: Tracing;
  metrics: Metrics;
  /** flush spans; logs are written synchronously */
  flush(): Promise<void>;
  shutdown(): Promise<void>;
}

export function createTelemetry(opts: TelemetryOptions): Telemetry {
  const env = opts.env ?? process.env;
  const log = createLogger({
    service: opts.service,
    level: opts.logLevel ?? env.LOG_LEVEL ?? "info",
    ...(opts.logDestination ? { destination: opts.logDestination } : {}),
  });
  const tracing = createTracing({
    service: opts.service,
    ...(opts.version ? { version: opts.version } : {}),
    ...(opts.spanExporter ? { exporter: opts.spanExporter } : {}),
    otlpEndpoint: opts.otlpEndpoint,
    env,
  });
  const metrics = new Metrics(opts.service, { defaults: opts.defaultMetrics ?? true });
  return {
    service: opts.service,
    log,
    tracer: tracing.tracer,
    tracing,
    metrics,
    flush: () => tracing.flush(),
    async shutdown() {
      await tracing.shutdown().catch((err: unknown) => log.warn({ err }, "flushing spans failed"));
      log.flush?.();
    },
  };
}
