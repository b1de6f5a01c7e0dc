import { hostname } from "node:os";
import { redactUrls } from "@mailpipe/telemetry";
import { z } from "zod";
import { redisConfig } from "./redis.ts";

/** Parses "250ms", "30s", "5m", "4h", "5d" or a plain number of milliseconds. */
export function parseDuration(value: string): number | null {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/i.exec(value);
  if (!m) return null;
  const n = Number(m[1]);
  const unit = (m[2] ?? "ms").toLowerCase();
  const factor = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[unit] ?? 1;
  return Math.round(n * factor);
}

/** A duration variable (see parseDuration); the parsed value is milliseconds. */
export function duration(defaultValue: string) {
  return z
    .string()
    .default(defaultValue)
    .transform((v, ctx) => {
      const ms = parseDuration(v);
      if (ms === null) {
        ctx.addIssue({
          code: "custom",
          message: `"${v}" is not a duration (use e.g. 500ms, 30s, 5m, 4h, 5d)`,
        });
        return z.NEVER;
      }
      return ms;
    });
}

/** A list of durations, e.g. RETRY_SCHEDULE="1m,5m,15m". */
export function durationList(defaultValue: string) {
  return z
    .string()
    .default(defaultValue)
    .transform((v, ctx) => {
      const out: number[] = [];
      for (const part of v.split(",")) {
        const ms = parseDuration(part);
        if (ms === null || ms <= 0) {
          ctx.addIssue({ code: "custom", message: `"${part.trim()}" is not a positive duration` });
          return z.NEVER;
        }
        out.push(ms);
      }
      return out;
    });
}

/** A byte size: "25M", "1G", "512K" or a plain number of bytes. */
export function byteSize(defaultValue: string) {
  return z
    .string()
    .default(defaultValue)
    .transform((v, ctx) => {
      const m = /^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$/i.exec(v);
      if (!m) {
        ctx.addIssue({ code: "custom", message: `"${v}" is not a size (use e.g. 512K, 25M, 1G)` });
        return z.NEVER;
      }
      const unit = (m[2] ?? "").toUpperCase()[0];
      const factor = unit === "K" ? 1024 : unit === "M" ? 1024 ** 2 : unit === "G" ? 1024 ** 3 : 1;
      return Math.round(Number(m[1]) * factor);
    });
}

export const port = (defaultValue: number) => z.coerce.number().int().min(0).max(65535).default(defaultValue);

export const bool = (defaultValue: boolean) =>
  z
    .enum(["true", "false", "1", "0", "yes", "no"])
    .default(defaultValue ? "true" : "false")
    .transform((v) => v === "true" || v === "1" || v === "yes");

/** A list of host[:port] entries, e.g. DNS_SERVERS="127.0.0.1:5353,10.0.0.2". */
export const hostList = (defaultValue: string) =>
  z
    .string()
    .default(defaultValue)
    .transform((v) =>
      v
        .split(",")
        .map((s) => s.trim())
        .filter(Boolean),
    );

/** Variables every service reads, with the same names everywhere. */
export const baseConfig = z.object({
  NATS_URL: z.string().min(1).default("nats://127.0.0.1:4222"),
  ...redisConfig.shape,
  MAIL_HOSTNAME: z.string().min(1).default(hostname()),
  HTTP_HOST: z.string().default("0.0.0.0"),
  HTTP_PORT: port(9090),
  LOG_LEVEL: z.enum(["fatal", "error", "warn", "info", "debug", "trace", "silent"]).default("info"),
  SHUTDOWN_TIMEOUT: duration("30s"),
  JS_REPLICAS: z.coerce.number().int().min(1).max(5).default(1),
  EVENTS_MAX_AGE: duration("7d"),
  BODY_TTL: duration("10d"),
  OTEL_EXPORTER_OTLP_ENDPOINT: z.string().optional(),
});
export type BaseConfig = z.infer<typeof baseConfig>;

export class ConfigError extends Error {
  override name = "ConfigError";
}

/** Parses the environment; the error names every bad variable and why, never its value if secret. */
export function parseConfig<S extends z.ZodType>(
  schema: S,
  env: NodeJS.ProcessEnv = process.env,
): z.infer<S> {
  const r = schema.safeParse(env);
  if (r.success) return r.data;
  const lines = r.error.issues.map((i) => {
    const name = String(i.path[0] ?? "(environment)");
    return `  ${name}: ${i.message}${isSecret(name) ? "" : describeInput(env[name])}`;
  });
  throw new ConfigError(`invalid configuration:\n${lines.join("\n")}`);
}

function describeInput(v: string | undefined): string {
  return v === undefined
    ? " (not set)"
    : ` (got ${JSON.stringify(v.length > 80 ? `${v.slice(0, 80)}…` : v)})`;
}

const SECRET = /PASS|SECRET|TOKEN|PRIVATE|CREDENTIAL|_KEY$/i;

export function isSecret(name: string): boolean {
  return SECRET.test(name);
}

/** The config as it is safe to log: secrets masked, passwords removed from URLs. */
export function redactConfig(config: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(config)) {
    if (isSecret(k)) out[k] = v === undefined || v === "" ? v : "[redacted]";
    else if (typeof v === "string") out[k] = redactUrls(v);
    else out[k] = v;
  }
  return out;
}
