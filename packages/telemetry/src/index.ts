export { attr } from "./attributes.ts";
export { boundedLabel, OTHER_LABEL } from "./bounded-label.ts";
export { contextWithQueueId, currentQueueId, currentTraceId, withQueueId } from "./context.ts";
export { createLogger, type Logger, type LoggerOptions } from "./logger.ts";
export { type Counter, type Gauge, type Histogram, Metrics } from "./metrics.ts";
export { redactUrls } from "./redact.ts";
export { createTelemetry, type Telemetry, type TelemetryOptions } from "./telemetry.ts";
export {
  cleanAttributes,
  createTracing,
  InMemorySpanExporter,
  inSpan,
  installContextGlobals,
  type ReadableSpan,
  type Span,
  type SpanExporter,
  SpanKind,
  type SpanOptions,
  SpanStatusCode,
  type Tracer,
  type Tracing,
  type TracingOptions,
} from "./tracing.ts";
