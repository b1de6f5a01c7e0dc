import { format } from "node:util";
import type { Logger } from "@mailpipe/telemetry";

type LogFn = (data?: unknown, message?: unknown, ...args: unknown[]) => void;

/**
 * smtp-server's bunyan-style logger, written to pino at debug level whatever level smtp-server uses:
 * it logs every command, connection and client reset at info/error, which would drown the service's
 * own lines. Only `tnx` (what happened) and `cid` (the connection) of its data object are kept;
 * AUTH arguments are already redacted by smtp-server.
 */
export function smtpServerLogger(
  log: Logger,
): Record<"trace" | "debug" | "info" | "warn" | "error" | "fatal", LogFn> {
  const child = log.child({ component: "smtp-server" });
  const write: LogFn = (data, message, ...args) => {
    if (!child.isLevelEnabled("debug")) return;
    if (typeof data === "string") {
      child.debug(format(data, ...(message === undefined ? [] : [message]), ...args));
      return;
    }
    const d = (data ?? {}) as { tnx?: unknown; cid?: unknown };
    child.debug({ tnx: d.tnx, cid: d.cid }, format(String(message ?? ""), ...args));
  };
  return { trace: write, debug: write, info: write, warn: write, error: write, fatal: write };
}
