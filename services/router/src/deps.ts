import type { BodyStore, Bus } from "@mailpipe/bus";
import type { Directory } from "@mailpipe/directory";
import type { DnsResolver } from "@mailpipe/dns";
import type { MailQueue } from "@mailpipe/queue";
import type { Telemetry } from "@mailpipe/telemetry";
import type { Admission } from "./admission.ts";
import type { Config } from "./config.ts";
import type { HoldCache } from "./holds.ts";
import type { RouterMetrics } from "./metrics.ts";
import type { RetryPolicy } from "./retry-policy.ts";

/** What every part of the router works with; built once in router.ts. */
export interface RouterContext {
  config: Config;
  telemetry: Telemetry;
  bus: Bus;
  bodies: BodyStore;
  queue: MailQueue;
  /** the directory in use now (it reloads) */
  directory: () => Directory;
  resolver: DnsResolver;
  metrics: RouterMetrics;
  policy: RetryPolicy;
  /** destination slots and wait lists (cluster-wide destination limits) */
  admission: Admission;
  /** operator holds, for new messages' first attempts */
  holds: HoldCache;
  now: () => number;
}
