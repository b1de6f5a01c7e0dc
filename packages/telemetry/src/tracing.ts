import { createRequire } from "node:module";
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
import { resourceFromAttributes } from "@opentelemetry/resources";
import {
  AlwaysOffSampler,
  AlwaysOnSampler,
  BatchSpanProcessor,
  ParentBasedSampler,
  type Sampler,
  SimpleSpanProcessor,
  type SpanExporter,
  type SpanProcessor,
  TraceIdRatioBasedSampler,
  TracerProvider,
} from "@opentelemetry/sdk-trace";

// the exporter of the protocol in use is loaded when tracing starts, not the three (gRPC's is large)
const require = createRequire(import.meta.url);

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
  /** OTLP base endpoint; defaults to OTEL_EXPORTER_OTLP_ENDPOINT */
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

export type OtlpProtocol = "http/protobuf" | "http/json" | "grpc";
const PROTOCOLS: readonly OtlpProtocol[] = ["http/protobuf", "http/json", "grpc"];

export class TracingConfigError extends Error {
  override name = "TracingConfigError";
}

/** `k1=v1,k2=v2` with percent-encoded values (OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES). */
export function parseKeyValues(text: string | undefined, what: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of (text ?? "").split(",")) {
    if (part.trim() === "") continue;
    const eq = part.indexOf("=");
    if (eq <= 0) throw new TracingConfigError(`${what}: "${part.trim()}" is not key=value`);
    try {
      out[decodeURIComponent(part.slice(0, eq).trim())] = decodeURIComponent(part.slice(eq + 1).trim());
    } catch {
      throw new TracingConfigError(`${what}: "${part.trim()}" is not percent-encoded correctly`);
    }
  }
  return out;
}

export interface OtlpSettings {
  protocol: OtlpProtocol;
  /** the traces endpoint: a URL ending in /v1/traces for HTTP, host:port as a URL for gRPC */
  url: string;
  headers: Record<string, string>;
  timeoutMillis: number;
  compression: "gzip" | "none";
}

/**
 * The OTLP exporter settings from the standard variables (signal-specific ones first), or undefined
 * when no endpoint is set (nothing is exported then).
 */
export function otlpSettings(env: NodeJS.ProcessEnv, endpointOverride?: string): OtlpSettings | undefined {
  const protocol = (env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ??
    env.OTEL_EXPORTER_OTLP_PROTOCOL ??
    "http/protobuf") as OtlpProtocol;
  if (!PROTOCOLS.includes(protocol)) {
    throw new TracingConfigError(
      `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL is "${protocol}": use http/protobuf (the default), http/json or grpc`,
    );
  }
  const base = endpointOverride ?? env.OTEL_EXPORTER_OTLP_ENDPOINT;
  const signal = env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
  // the general endpoint gets the signal's path over HTTP; gRPC and the traces endpoint are taken as given
  const url = signal ?? (base ? (protocol === "grpc" ? base : `${base.replace(/\/$/, "")}/v1/traces`) : "");
  if (!url) return undefined;
  const timeout = Number(env.OTEL_EXPORTER_OTLP_TRACES_TIMEOUT ?? env.OTEL_EXPORTER_OTLP_TIMEOUT ?? 10_000);
  const compression =
    env.OTEL_EXPORTER_OTLP_TRACES_COMPRESSION ?? env.OTEL_EXPORTER_OTLP_COMPRESSION ?? "none";
  if (compression !== "gzip" && compression !== "none") {
    throw new TracingConfigError(
      `OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION is "${compression}": use gzip or none`,
    );
  }
  return {
    protocol,
    url,
    headers: {
      ...parseKeyValues(env.OTEL_EXPORTER_OTLP_HEADERS, "OTEL_EXPORTER_OTLP_HEADERS"),
      ...parseKeyValues(env.OTEL_EXPORTER_OTLP_TRACES_HEADERS, "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
    },
    timeoutMillis: Number.isFinite(timeout) && timeout > 0 ? timeout : 10_000,
    compression,
  };
}

function otlpExporter(s: OtlpSettings): SpanExporter {
  const common = { url: s.url, timeoutMillis: s.timeoutMillis, compression: s.compression as never };
  if (s.protocol === "grpc") {
    const { Metadata } = require("@grpc/grpc-js") as typeof import("@grpc/grpc-js");
    const metadata = new Metadata();
    for (const [k, v] of Object.entries(s.headers)) metadata.set(k, v);
    const { OTLPTraceExporter } =
      require("@opentelemetry/exporter-trace-otlp-grpc") as typeof import("@opentelemetry/exporter-trace-otlp-grpc");
    return new OTLPTraceExporter({ ...common, metadata });
  }
  const { OTLPTraceExporter } = (
    s.protocol === "http/json"
      ? require("@opentelemetry/exporter-trace-otlp-http")
      : require("@opentelemetry/exporter-trace-otlp-proto")
  ) as typeof import("@opentelemetry/exporter-trace-otlp-proto");
  return new OTLPTraceExporter({ ...common, headers: s.headers });
}

/**
 * OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG as the specification names them. Unset: every span
 * of a service that exports is recorded whatever its parent's flag says, so a service that exports
 * shows its part of a message's trace even when the service before it does not export.
 */
export function samplerFromEnv(env: NodeJS.ProcessEnv): Sampler | undefined {
  const name = env.OTEL_TRACES_SAMPLER;
  if (name === undefined || name === "") return undefined;
  const ratio = () => {
    const arg = env.OTEL_TRACES_SAMPLER_ARG;
    if (arg === undefined || arg === "") return 1;
    const r = Number(arg);
    if (!Number.isFinite(r) || r < 0 || r > 1) {
      throw new TracingConfigError(`OTEL_TRACES_SAMPLER_ARG is "${arg}": a ratio between 0 and 1`);
    }
    return r;
  };
  switch (name) {
    case "always_on":
      return new AlwaysOnSampler();
    case "always_off":
      return new AlwaysOffSampler();
    case "traceidratio":
      return new TraceIdRatioBasedSampler(ratio());
    case "parentbased_always_on":
      return new ParentBasedSampler({ root: new AlwaysOnSampler() });
    case "parentbased_always_off":
      return new ParentBasedSampler({ root: new AlwaysOffSampler() });
    case "parentbased_traceidratio":
      return new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(ratio()) });
    default:
      throw new TracingConfigError(
        `OTEL_TRACES_SAMPLER is "${name}": use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio`,
      );
  }
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
  const otlp = otlpSettings(env, otlpEndpoint);
  if (otlp) {
    processors.push(
      new BatchSpanProcessor({
        exporter: otlpExporter(otlp),
        scheduledDelayMillis: Number(env.OTEL_BSP_SCHEDULE_DELAY ?? 2000),
        maxQueueSize: 8192,
        maxExportBatchSize: 512,
      }),
    );
  }
  if (exporter) processors.push(new SimpleSpanProcessor({ exporter }));
  const sampler = samplerFromEnv(env);
  const resourceAttributes = parseKeyValues(env.OTEL_RESOURCE_ATTRIBUTES, "OTEL_RESOURCE_ATTRIBUTES");
  // Nothing to export: spans still get ids (logs, events and the traceparent carry them) but are
  // not recorded, which saves their cost.
  const provider = new TracerProvider({
    sampler: processors.length === 0 ? new AlwaysOffSampler() : (sampler ?? new AlwaysOnSampler()),
    resource: resourceFromAttributes({
      "service.namespace": "mailpipe",
      ...(version ? { "service.version": version } : {}),
      "service.instance.id": `${env.HOSTNAME ?? "local"}-${process.pid}`,
      ...resourceAttributes,
      // OTEL_SERVICE_NAME wins over a service.name in OTEL_RESOURCE_ATTRIBUTES, as the spec says
      "service.name": env.OTEL_SERVICE_NAME ?? resourceAttributes["service.name"] ?? service,
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
