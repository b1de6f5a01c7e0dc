import { type Context, context, createContextKey, trace } from "@opentelemetry/api";

const QUEUE_ID = createContextKey("mailpipe.queueId");

/** Runs `fn` with `queueId` attached to the active context, so every log line inside carries it. */
export function withQueueId<T>(queueId: string, fn: () => T): T {
  return context.with(context.active().setValue(QUEUE_ID, queueId), fn);
}

export function contextWithQueueId(ctx: Context, queueId: string): Context {
  return ctx.setValue(QUEUE_ID, queueId);
}

export function currentQueueId(): string | undefined {
  return context.active().getValue(QUEUE_ID) as string | undefined;
}

/** The active trace id, when a span is recording. */
export function currentTraceId(): string | undefined {
  const sc = trace.getSpanContext(context.active());
  return sc && sc.traceId !== "00000000000000000000000000000000" ? sc.traceId : undefined;
}
