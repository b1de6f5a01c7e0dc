// How a process reaches Redis: REDIS_URL, or the master the Sentinels name. Its own module (only
// ioredis and zod) so that mailctl can import it without the service runtime, NATS and telemetry.
import { Redis, type RedisOptions } from "ioredis";
import { z } from "zod";

/** The Redis variables, with their defaults; part of every service's config and read by mailctl. */
export const redisConfig = z.object({
  REDIS_URL: z.string().min(1).default("redis://127.0.0.1:6379"),
  /** host:port of Redis Sentinels (comma-separated); set, they name the master instead of REDIS_URL's host */
  REDIS_SENTINELS: z.string().optional(),
  REDIS_SENTINEL_NAME: z.string().min(1).default("mymaster"),
  REDIS_SENTINEL_PASSWORD: z.string().optional(),
});
export type RedisConfig = z.infer<typeof redisConfig>;

/** The Sentinels of REDIS_SENTINELS ("host:port,host"; the port defaults to 26379). */
function parseSentinels(value: string): { host: string; port: number }[] {
  return value
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s !== "")
    .map((s) => {
      const i = s.lastIndexOf(":");
      return i > 0 ? { host: s.slice(0, i), port: Number(s.slice(i + 1)) } : { host: s, port: 26379 };
    });
}

/**
 * A Redis client: REDIS_URL, or with REDIS_SENTINELS the master that the Sentinels name
 * REDIS_SENTINEL_NAME (ioredis asks them, and asks again after a failover); REDIS_URL then still gives
 * the password, user and database. Not connected yet (lazyConnect). `overrides` change how it
 * connects and retries (mailctl gives up at once instead of retrying like a service).
 */
export function createRedis(
  config: Pick<
    RedisConfig,
    "REDIS_URL" | "REDIS_SENTINELS" | "REDIS_SENTINEL_NAME" | "REDIS_SENTINEL_PASSWORD"
  >,
  overrides: Pick<
    RedisOptions,
    "maxRetriesPerRequest" | "connectTimeout" | "retryStrategy" | "sentinelRetryStrategy"
  > = {},
): Redis {
  const common = {
    lazyConnect: true,
    maxRetriesPerRequest: 2,
    // commands issued in the same tick go out in one write (one syscall instead of many)
    enableAutoPipelining: true,
    connectTimeout: 5000,
    retryStrategy: (times: number) => Math.min(times * 200, 2000),
  };
  if (!config.REDIS_SENTINELS) return new Redis(config.REDIS_URL, { ...common, ...overrides });
  const url = new URL(config.REDIS_URL);
  return new Redis({
    ...common,
    sentinels: parseSentinels(config.REDIS_SENTINELS),
    name: config.REDIS_SENTINEL_NAME,
    ...(config.REDIS_SENTINEL_PASSWORD ? { sentinelPassword: config.REDIS_SENTINEL_PASSWORD } : {}),
    ...(url.password ? { password: decodeURIComponent(url.password) } : {}),
    ...(url.username ? { username: decodeURIComponent(url.username) } : {}),
    ...(url.pathname.length > 1 ? { db: Number(url.pathname.slice(1)) } : {}),
    sentinelRetryStrategy: (times: number) => Math.min(times * 200, 2000),
    ...overrides,
  });
}
