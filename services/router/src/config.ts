import { directoryFileSetting } from "@mailpipe/directory";
import { dnsServersSetting } from "@mailpipe/dns";
import { baseConfig, duration, durationList } from "@mailpipe/service-kit";
import { z } from "zod";
import { limitsSetting, rateSetting } from "./destination-limits.ts";

/** router's environment (README.md lists every variable with its default). */
export const config = baseConfig.extend({
  DIRECTORY_FILE: directoryFileSetting(),
  /** host[:port] list for MX/A/AAAA lookups; empty: the nameservers of /etc/resolv.conf */
  DNS_SERVERS: dnsServersSetting(),
  /** wait after attempt 1, 2, …; after the last, its interval repeats */
  RETRY_SCHEDULE: durationList("1m,5m,15m,30m,1h,2h,4h"),
  /** ± this fraction of each interval, per recipient, so retries of a burst spread out */
  RETRY_JITTER: z.coerce.number().min(0).max(0.5).default(0.1),
  /** give up (bounce) this long after acceptance */
  QUEUE_LIFETIME: duration("5d"),
  /** send one delay notice once a message has waited this long; 0 disables */
  DELAY_WARNING: duration("4h"),
  ROUTER_CONCURRENCY: z.coerce.number().int().min(1).max(4096).default(64),
  SCHEDULER_INTERVAL: duration("1s"),
  SCHEDULER_BATCH: z.coerce.number().int().min(1).max(10_000).default(500),
  /** how long a claimed job stays with this replica before another may take it */
  SCHEDULER_LEASE: duration("60s"),
  /**
   * a recipient handed to a worker with no status back for this long, whose request is no longer
   * waiting in MAIL_DELIVER, is dispatched again (or expires); a request still queued is left alone
   */
  STALE_DISPATCH: duration("1h").refine((ms) => ms > 0, { message: "must be longer than 0" }),
  /** bounces of one message arriving within this time go into one DSN */
  DSN_BATCH_DELAY: duration("2s"),
  /** separates a local part from its +tag; empty turns plus-addressing off */
  PLUS_SEPARATOR: z.string().max(4).default("+"),
  /** SMTP transactions in flight at once to one destination site, across every delivery worker */
  DESTINATION_CONNECTIONS: z.coerce.number().int().min(1).max(100_000).default(20),
  /** messages per period to one destination site (`300/min`); empty: no rate limit */
  DESTINATION_RATE: rateSetting(""),
  /** per-destination overrides (YAML or JSON): `gmail.com: { connections: 20, rate: 300/min }` */
  DESTINATION_LIMITS: limitsSetting(),
  /**
   * a destination slot not renewed for this long is looked at again: given back when its request is
   * no longer in MAIL_DELIVER (a router or worker died), kept while it is
   */
  DESTINATION_SLOT_LEASE: duration("60s").refine((ms) => ms >= 1000, { message: "must be 1s or longer" }),
  /**
   * Redis replicas that must have the router's writes before it acks a message or a status (WAIT):
   * with Sentinel, a failover then keeps them. 0: no wait (replication is asynchronous)
   */
  REDIS_WAIT_REPLICAS: z.coerce.number().int().min(0).max(10).default(0),
  /** how long to wait for them; short of them, the message is handled again later */
  REDIS_WAIT_TIMEOUT: duration("1s").refine((ms) => ms > 0, { message: "must be longer than 0" }),
  /** destination sites with their own `site` label on the destination metrics; later ones are "other" */
  METRICS_MAX_DESTINATIONS: z.coerce.number().int().min(0).max(100_000).default(200),
});
export type Config = z.infer<typeof config>;
