import { byteSize, duration } from "@mailpipe/service-kit";
import { z } from "zod";
import type { ContentFilterOptions } from "./filter.ts";
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

const optionalText = z
  .string()
  .trim()
  .optional()
  .transform((v) => (v ? v : undefined));

/**
 * The content filter's variables (mx and msa read the same names; each service is filtered only
 * when its own RSPAMD_URL is set). README.md documents them with their defaults.
 */
export const filterConfig = {
  /** rspamd's normal worker, e.g. http://rspamd:11333; unset = no filtering (and no work for it) */
  RSPAMD_URL: optionalText.pipe(
    z
      .url({
        protocol: /^https?$/,
        error: "RSPAMD_URL must be an http:// or https:// URL, e.g. http://rspamd:11333",
      })
      .optional(),
  ),
  /** rspamd taking longer: the filter failed (FILTER_FAIL_MODE says what then) */
  RSPAMD_TIMEOUT: duration("10s"),
  /** sent as `Password` (only the controller worker asks for one) */
  RSPAMD_PASSWORD: optionalText,
  /** sent as `Settings-ID`: which of rspamd's settings to apply (e.g. `outbound` for msa) */
  RSPAMD_SETTINGS_ID: optionalText,
  /** tempfail: rspamd down, slow or unreadable = 451 4.7.1; accept: the message is taken unfiltered */
  FILTER_FAIL_MODE: z.enum(["tempfail", "accept"]).default("tempfail"),
  /** messages bigger than this are taken without being filtered */
  FILTER_MAX_SIZE: byteSize("10M"),
};

type FilterConfig = { [K in keyof typeof filterConfig]?: z.infer<(typeof filterConfig)[K]> };

/** The content filter those variables describe, or undefined when RSPAMD_URL is unset. */
export function filterSettings(
  c: FilterConfig,
  { modify }: { modify: boolean },
): ContentFilterOptions | undefined {
  if (!c.RSPAMD_URL) return undefined;
  return {
    url: c.RSPAMD_URL,
    timeoutMs: c.RSPAMD_TIMEOUT ?? 10_000,
    failMode: c.FILTER_FAIL_MODE ?? "tempfail",
    maxSize: c.FILTER_MAX_SIZE ?? 10 * 1024 * 1024,
    password: c.RSPAMD_PASSWORD,
    settingsId: c.RSPAMD_SETTINGS_ID,
    modify,
  };
}

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
