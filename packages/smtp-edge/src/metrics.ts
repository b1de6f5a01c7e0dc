import type { Metrics } from "@mailpipe/telemetry";

const BYTE_BUCKETS = [1024, 4096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304, 16_777_216, 67_108_864];

/** The metrics every SMTP edge exports (names get the `mailpipe_` prefix; `service` is a default label). */
export function edgeMetrics(metrics: Metrics, budget?: { readonly used: number }) {
  return {
    sessions: metrics.counter("smtp_sessions_total", "SMTP sessions opened (including refused ones)"),
    active: metrics.gauge("smtp_sessions_active", "SMTP sessions open now"),
    replies: metrics.counter("smtp_replies_total", "SMTP replies sent, by basic code", ["code"]),
    messages: metrics.counter(
      "smtp_messages_total",
      "Messages at the end of DATA: accepted (250) or rejected (any 4xx/5xx)",
      ["result"],
    ),
    bytes: metrics.histogram("smtp_message_bytes", "Size of accepted messages in bytes", [], BYTE_BUCKETS),
    memory: metrics.gauge(
      "smtp_memory_budget_bytes",
      "DATA bytes held in memory now, counted against SMTP_MEMORY_BUDGET",
      [],
      function () {
        this.set(budget?.used ?? 0);
      },
    ),
    memoryRefusals: metrics.counter(
      "smtp_memory_budget_refusals_total",
      "Transactions refused with 452 4.3.1 because SMTP_MEMORY_BUDGET was used up, at MAIL (declared SIZE) or at the end of DATA",
      ["stage"],
    ),
  };
}

export type EdgeMetrics = ReturnType<typeof edgeMetrics>;
