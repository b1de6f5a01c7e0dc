import {
  context,
  propagation,
  type Span,
  SpanKind,
  SpanStatusCode,
  type Tracer,
  trace,
} from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import {
  AlwaysOffSampler,
  AlwaysOnSampler,
  BatchSpanProcessor,
  SimpleSpanProcessor,
  type SpanExporter,
  type SpanProcessor,
  TracerProvider,
} from "@opentelemetry/sdk-trace";

export { type Span, SpanKind, SpanStatusCode, type Tracer } from "@opentelemetry/api";
export { InMemorySpanExporter, type ReadableSpan, type SpanExporter } from "@opentelemetry/sdk-trace";

let globalsInstalled = false;

/** Context manager and W3C propagator are process-wide; install them once. */
export function installContextGlobals(): void {
  if (globalsInstalled) return;
  globalsInstalled = true;
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  propagation.setGlobalPropagator(new W3CTraceContextPropagator());
}

export interface TracingOptions {
  service: string;
  version?: string;
  /** extra exporter, exported span by span (tests pass an InMemorySpanExporter) */
  exporter?: SpanExporter;
  /** OTLP/HTTP base endpoint; defaults to OTEL_EXPORTER_OTLP_ENDPOINT */
  otlpEndpoint?: string | undefined;
  env?: NodeJS.ProcessEnv;
}

export interface Tracing {
  tracer: Tracer;
  provider: TracerProvider;
  /** true when spans leave the process (OTLP endpoint or a test exporter) */
  exporting: boolean;
  flush(): Promise<void>;
  shutdown(): Promise<void>;
}

export function createTracing({
  service,
  version,
  exporter,
  otlpEndpoint,
  env = process.env,
}: TracingOptions): Tracing {
  installContextGlobals();
  const processors: SpanProcessor[] = [];
  const endpoint = otlpEndpoint ?? env.OTEL_EXPORTER_OTLP_ENDPOINT;
  const tracesUrl =
    env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT ?? (endpoint ? `${endpoint.replace(/\/$/, "")}/v1/traces` : "");
  if (tracesUrl) {
    processors.push(
      new BatchSpanProcessor({
        exporter: new OTLPTraceExporter({ url: tracesUrl }),
        scheduledDelayMillis: Number(env.OTEL_BSP_SCHEDULE_DELAY ?? 2000),
        maxQueueSize: 8192,
        maxExportBatchSize: 512,
      }),
    );
  }
  if (exporter) processors.push(new SimpleSpanProcessor({ exporter }));
  // Nothing to export: spans still get ids (logs, events and the traceparent carry them) but are
  // not recorded, which saves their cost. When exporting, record every span whatever the
  // upstream flag says, so a service that exports still shows its part of a message's trace.
  const provider = new TracerProvider({
    sampler: processors.length > 0 ? new AlwaysOnSampler() : new AlwaysOffSampler(),
    resource: resourceFromAttributes({
      "service.name": env.OTEL_SERVICE_NAME ?? service,
      "service.namespace": "mailpipe",
      ...(version ? { "service.version": version } : {}),
      "service.instance.id": `${env.HOSTNAME ?? "local"}-${process.pid}`,
    }),
    spanProcessors: processors,
  });
  // Our code passes tracers explicitly; the global provider is for libraries that ask for one.
  trace.setGlobalTracerProvider(provider);
  return {
    tracer: provider.getTracer(`mailpipe-${service}`, version),
    provider,
    exporting: processors.length > 0,
    flush: () => provider.forceFlush(),
    shutdown: () => provider.shutdown(),
  };
}

export interface SpanOptions {
  kind?: SpanKind;
  attributes?: Record<string, string | number | boolean | undefined>;
}

/**
 * Runs `fn` inside a new active span, ending it when `fn` settles. A thrown error is recorded
 * (message only: stack traces stay in logs) and the span marked as failed.
 */
export async function inSpan<T>(
  tracer: Tracer,
  name: string,
  options: SpanOptions,
  fn: (span: Span) => Promise<T> | T,
): Promise<T> {
  const attributes = cleanAttributes(options.attributes);
  return tracer.startActiveSpan(
    name,
    { kind: options.kind ?? SpanKind.INTERNAL, attributes },
    async (span) => {
      try {
        return await fn(span);
      } catch (err) {
        span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error)?.message ?? String(err) });
        span.recordException({
          name: (err as Error)?.name ?? "Error",
          message: (err as Error)?.message ?? String(err),
        });
        throw err;
      } finally {
        span.end();
      }
    },
  );
}

export function cleanAttributes(
  attrs: Record<string, string | number | boolean | undefined> | undefined,
): Record<string, string | number | boolean> {
  const out: Record<string, string | number | boolean> = {};
  if (attrs) for (const [k, v] of Object.entries(attrs)) if (v !== undefined) out[k] = v;
  return out;
}
