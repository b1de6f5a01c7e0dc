// Operator holds (`mailctl queue hold`), as the router sees them when it routes a new message: the
// rules live in Redis (MailQueue.hold); this keeps a copy refreshed once a second, so routing asks
// Redis nothing per message. Retries are held by the queue itself when they come due (claim).
import type { MailQueue } from "@mailpipe/queue";
import type { Logger } from "@mailpipe/telemetry";

export interface HoldCache {
  /** whether a new message's first attempt to `domain` is held */
  held(queueId: string, domain: string): boolean;
  /** reads the rules now (and then once a second until stop) */
  start(): Promise<void>;
  stop(): void;
}

export function createHoldCache(queue: MailQueue, log: Logger, intervalMs = 1000): HoldCache {
  let all = false;
  let domains = new Set<string>();
  let messages = new Set<string>();
  let timer: NodeJS.Timeout | undefined;
  let failing = false;
  const refresh = async () => {
    try {
      const rules = await queue.holds();
      all = rules.some((r) => r.kind === "all");
      domains = new Set(rules.flatMap((r) => (r.kind === "destination" ? [r.domain] : [])));
      messages = new Set(rules.flatMap((r) => (r.kind === "message" ? [r.queueId] : [])));
      if (failing) log.info("operator holds readable again");
      failing = false;
    } catch (err) {
      // the last rules read stay in force
      if (!failing)
        log.warn({ err: (err as Error).message }, "could not read operator holds; keeping the last ones");
      failing = true;
    }
  };
  return {
    held: (queueId, domain) => all || messages.has(queueId) || domains.has(domain.toLowerCase()),
    async start() {
      await refresh();
      timer = setInterval(() => void refresh(), intervalMs);
      timer.unref();
    },
    stop() {
      if (timer) clearInterval(timer);
    },
  };
}
