import { type Context, context, propagation, ROOT_CONTEXT } from "@opentelemetry/api";

/** The active span's W3C traceparent, to store with the message. */
export function currentTraceparent(): string | undefined {
  const carrier: Record<string, string> = {};
  propagation.inject(context.active(), carrier);
  return carrier.traceparent;
}

/** A context continuing the stored trace, so a later attempt joins the message's original trace. */
export function contextFromTraceparent(traceparent: string | undefined): Context {
  return traceparent ? propagation.extract(ROOT_CONTEXT, { traceparent }) : ROOT_CONTEXT;
}
