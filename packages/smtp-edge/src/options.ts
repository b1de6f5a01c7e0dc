import type { Bus } from "@mailpipe/bus";
import type { Telemetry } from "@mailpipe/telemetry";
import type { ContentFilter } from "./filter.ts";
import type { EdgeHooks } from "./hooks.ts";
import type { MemoryBudget } from "./memory-budget.ts";
import type { TlsFiles } from "./tls-files.ts";

export interface SmtpEdgeOptions {
  service: "mx" | "msa";
  /** MAIL_HOSTNAME: the greeting, EHLO reply and Received header */
  hostname: string;
  telemetry: Telemetry;
  bus: Bus;
  hooks: EdgeHooks;
  host?: string;
  /** 0 = any free port (tests) */
  port: number;
  /** implicit TLS from the first byte (submissions port 465); needs `tls` */
  secure?: boolean;
  /** certificate and key files; without them STARTTLS is not offered (a warning is logged) */
  tls?: TlsFiles | undefined;
  /** how often the TLS files are checked for a renewal (default 5 s) */
  tlsPollIntervalMs?: number;
  /** expect a PROXY protocol v1 header: true from every peer, or from the listed load balancer addresses */
  useProxy?: boolean | string[];
  /** reverse DNS of the client (for the Received header); omitted = no lookup */
  reverseLookup?: ((ip: string) => Promise<string[]>) | undefined;
  /** default 1000 */
  reverseLookupTimeoutMs?: number;
  /** SIZE, advertised and enforced (552 5.3.4) */
  maxMessageSize: number;
  /** more RCPTs get 452 4.5.3 */
  maxRecipients: number;
  maxConnections: number;
  maxConnectionsPerIp: number;
  /** no byte from the client for this long: 421 4.4.2 */
  idleTimeoutMs: number;
  /** DATA (354 to the final dot) taking longer: 421 4.4.2 */
  dataTimeoutMs: number;
  /** a connection open longer: 421 4.4.2 */
  sessionTimeoutMs: number;
  /** more Received fields than this: 554 5.4.6 (a loop); default 50 */
  maxReceivedHeaders?: number;
  /** leave the client's IP and HELO out of our Received field (msa privacy) */
  hideClientInReceived?: boolean;
  /** name the authenticated user in our Received field (msa; off by default) */
  authUserInReceived?: boolean;
  /** text after "ESMTP" in the greeting */
  banner?: string;
  /**
   * storing and publishing one message may take this long before 451 (default 30 s); at shutdown,
   * up to this much of `close()`'s time is kept for messages being stored (see close)
   */
  acceptTimeoutMs?: number;
  /**
   * DATA bytes held in memory across sessions: a shared `MemoryBudget` (from `edgeLimits`, one per
   * process), or a size for this edge alone; default 512 MiB. Must not be below `maxMessageSize`.
   */
  memoryBudget?: MemoryBudget | number;
  /**
   * the content filter (rspamd) every message goes through before the end-of-DATA reply; absent =
   * no filtering. One per process (msa's listeners share it); the service closes it.
   */
  filter?: ContentFilter | undefined;
}
