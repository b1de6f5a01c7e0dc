import { context, trace } from "@opentelemetry/api";
import pino, { type DestinationStream, type Logger } from "pino";
import { currentQueueId } from "./context.ts";

export type { Logger } from "pino";

/** Keys whose values never reach a log line. */
const REDACT = [
  "password",
  "pass",
  "*.password",
  "*.pass",
  "auth.password",
  "authorization",
  "*.authorization",
  "privateKey",
  "*.privateKey",
  "secret",
  "*.secret",
];

export interface LoggerOptions {
  service: string;
  level?: string;
  destination?: DestinationStream;
}

/**
 * JSON lines with `service`, and `queueId`, `trace_id`, `span_id` whenever the active context has
 * them, so one message can be followed through every service's logs.
 */
export function createLogger({ service, level = "info", destination }: LoggerOptions): Logger {
  return pino(
    {
      level,
      base: { service },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      redact: { paths: REDACT, censor: "[redacted]" },
      mixin() {
        const out: Record<string, string> = {};
        const queueId = currentQueueId();
        if (queueId) out.queueId = queueId;
        const sc = trace.getSpanContext(context.active());
        if (sc && sc.traceId !== "00000000000000000000000000000000") {
          out.trace_id = sc.traceId;
          out.span_id = sc.spanId;
        }
        return out;
      },
    },
    destination,
  );
}
