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

/** Info lines wait at most this long in the buffer (warnings and errors are written at once). */
export const LOG_FLUSH_MS = 200;

/**
 * Standard output, written in blocks: a write per line was a system call per line, five per
 * message at the default level (a tenth of the pipeline's CPU). Lines are kept until 4 KiB are
 * waiting or LOG_FLUSH_MS has passed; a warning or an error flushes at once, and so does the
 * process's exit (a crash included). A SIGKILL loses at most the last LOG_FLUSH_MS of info lines.
 */
function bufferedStdout(): pino.DestinationStream & { flushSync(): void } {
  const dest = pino.destination({ dest: 1, sync: true, minLength: 4096 });
  const flush = () => {
    try {
      dest.flushSync();
    } catch {
      // stdout gone (the supervisor closed it): nothing left to write to
    }
  };
  setInterval(flush, LOG_FLUSH_MS).unref();
  process.once("exit", flush);
  return dest;
}

/**
 * JSON lines with `service`, and `queueId`, `trace_id`, `span_id` whenever the active context has
 * them, so one message can be followed through every service's logs.
 */
export function createLogger({ service, level = "info", destination }: LoggerOptions): Logger {
  const buffered = destination ? undefined : bufferedStdout();
  return pino(
    {
      level,
      hooks: {
        logMethod(args, method, lineLevel) {
          method.apply(this, args);
          if (buffered && lineLevel >= 40) buffered.flushSync();
        },
      },
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
    destination ?? buffered,
  );
}
