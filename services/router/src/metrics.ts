import type { MailQueue } from "@mailpipe/queue";
import type { Logger, Metrics } from "@mailpipe/telemetry";

export type RouterMetrics = ReturnType<typeof routerMetrics>;

const FINAL_BUCKETS = [
  1,
  5,
  30,
  60,
  300,
  900,
  1800,
  3600,
  4 * 3600,
  12 * 3600,
  86_400,
  2 * 86_400,
  5 * 86_400,
];

/** The router's Prometheus metrics; the queue gauges read Redis when scraped. */
export function routerMetrics(metrics: Metrics, queue: MailQueue, log: Logger) {
  let stats: ReturnType<MailQueue["stats"]> | undefined;
  // both gauges are collected in one scrape: share one Redis round trip between them
  const currentStats = () => {
    stats ??= queue.stats().finally(() => {
      setTimeout(() => {
        stats = undefined;
      }, 100).unref();
    });
    return stats;
  };
  metrics.gauge("queue_scheduled", "Retries waiting in the schedule (Redis)", [], async function () {
    try {
      this.set((await currentStats()).scheduled);
    } catch (err) {
      log.warn({ err: (err as Error).message }, "could not read queue stats for metrics");
    }
  });
  metrics.gauge(
    "queue_oldest_age_seconds",
    "Age of the oldest message not yet final (0 when the queue is empty)",
    [],
    async function () {
      try {
        const oldest = (await currentStats()).oldestReceivedAt;
        this.set(oldest ? Math.max(0, (Date.now() - Date.parse(oldest)) / 1000) : 0);
      } catch {
        // reported by queue_scheduled's collector
      }
    },
  );
  return {
    routed: metrics.counter("router_routed_total", "Recipients routed, by where they went", ["kind"]),
    dsn: metrics.counter("router_dsn_total", "DSNs generated (suppressed: none for a null sender)", ["kind"]),
    final: metrics.counter("router_final_total", "Recipients that reached a final state", ["state"]),
    finalSeconds: metrics.histogram(
      "message_final_seconds",
      "Time from acceptance until every recipient of a message was final",
      [],
      FINAL_BUCKETS,
    ),
    dispatched: metrics.counter("router_retries_dispatched_total", "Retry jobs re-dispatched", ["kind"]),
    scheduled: metrics.counter("router_retries_scheduled_total", "Retries written to the schedule"),
    staleRedispatched: metrics.counter(
      "router_stale_redispatched_total",
      "Recipients dispatched again because no worker reported on the previous attempt (STALE_DISPATCH)",
      ["kind"],
    ),
    staleQueued: metrics.counter(
      "router_stale_queued_total",
      "Silent recipients found still waiting in MAIL_DELIVER after STALE_DISPATCH: left to their worker, not dispatched again",
    ),
    staleExpired: metrics.counter(
      "router_stale_expired_total",
      "Recipients expired past QUEUE_LIFETIME with no worker report on their last attempt",
    ),
  };
}
