import { byteSize, duration } from "@mailpipe/service-kit";
import { z } from "zod";
import { MemoryBudget } from "./memory-budget.ts";
import type { SmtpEdgeOptions } from "./server.ts";

const count = (defaultValue: number) => z.coerce.number().int().min(1).default(defaultValue);

/**
 * The variables both SMTP edges (mx, msa) read with the same meaning; spread into each service's
 * schema so the names and defaults cannot drift apart.
 */
export const edgeConfig = {
  /** advertised as SIZE and enforced: 552 5.3.4 */
  MAX_MESSAGE_SIZE: byteSize("25M"),
  /**
   * DATA bytes held in memory at once by the whole process (both msa listeners together); a
   * transaction that does not fit gets 452 4.3.1. At least MAX_MESSAGE_SIZE.
   */
  SMTP_MEMORY_BUDGET: byteSize("512M"),
  /** open connections per listener: 421 4.7.0 beyond */
  MAX_CONNECTIONS: count(1000),
  /** per client IP: 421 4.7.0 beyond */
  MAX_CONNECTIONS_PER_IP: count(20),
  /** no byte from the client for this long: 421 4.4.2 */
  SMTP_IDLE_TIMEOUT: duration("5m"),
  /** DATA taking longer (a slow trickle included): 421 4.4.2 */
  SMTP_DATA_TIMEOUT: duration("10m"),
  /** a connection open longer: 421 4.4.2 */
  SMTP_SESSION_TIMEOUT: duration("30m"),
  /** storing and publishing one message may take this long before the client gets 451 4.3.0 */
  SMTP_ACCEPT_TIMEOUT: duration("30s"),
  /** more Received fields than this is a mail loop: 554 5.4.6 */
  MAX_RECEIVED_HEADERS: count(50),
  /** how often the certificate files are checked for a renewal */
  TLS_RELOAD_INTERVAL: duration("5s"),
};

type EdgeConfig = { [K in keyof typeof edgeConfig]: z.infer<(typeof edgeConfig)[K]> };

/**
 * The smtp-edge options those variables set. Each call makes one memory budget: give the result to
 * every listener of the process so they share it.
 */
export function edgeLimits(
  c: EdgeConfig,
): Pick<
  SmtpEdgeOptions,
  | "maxMessageSize"
  | "maxConnections"
  | "maxConnectionsPerIp"
  | "idleTimeoutMs"
  | "dataTimeoutMs"
  | "sessionTimeoutMs"
  | "acceptTimeoutMs"
  | "maxReceivedHeaders"
  | "tlsPollIntervalMs"
  | "memoryBudget"
> {
  return {
    maxMessageSize: c.MAX_MESSAGE_SIZE,
    maxConnections: c.MAX_CONNECTIONS,
    maxConnectionsPerIp: c.MAX_CONNECTIONS_PER_IP,
    idleTimeoutMs: c.SMTP_IDLE_TIMEOUT,
    dataTimeoutMs: c.SMTP_DATA_TIMEOUT,
    sessionTimeoutMs: c.SMTP_SESSION_TIMEOUT,
    acceptTimeoutMs: c.SMTP_ACCEPT_TIMEOUT,
    maxReceivedHeaders: c.MAX_RECEIVED_HEADERS,
    tlsPollIntervalMs: c.TLS_RELOAD_INTERVAL,
    memoryBudget: new MemoryBudget(c.SMTP_MEMORY_BUDGET),
  };
}
