import { createRedis, redisConfig } from "@mailpipe/service-kit/redis";
import type { Redis } from "ioredis";
import { CommandError, type Io } from "./io.ts";

/**
 * Runs `fn` with a Redis client connected as the services connect (REDIS_URL, or the master that
 * REDIS_SENTINELS name), and disconnects after. An operator's command fails at once when Redis
 * cannot be reached, rather than retrying like a service.
 */
export async function withRedis<T>(io: Io, fn: (redis: Redis) => Promise<T>): Promise<T> {
  const parsed = redisConfig.safeParse(io.env);
  if (!parsed.success) {
    const why = parsed.error.issues.map((i) => `${String(i.path[0])}: ${i.message}`).join("; ");
    throw new CommandError(`invalid Redis settings (${why})`);
  }
  const config = parsed.data;
  const where = config.REDIS_SENTINELS
    ? `the master "${config.REDIS_SENTINEL_NAME}" through the Sentinels ${config.REDIS_SENTINELS}`
    : config.REDIS_URL.replace(/\/\/[^@]*@/, "//");
  const advice = config.REDIS_SENTINELS
    ? "set REDIS_SENTINELS and REDIS_SENTINEL_NAME (REDIS_SENTINEL_PASSWORD if the Sentinels have one)"
    : "set REDIS_URL";
  let redis: Redis;
  try {
    redis = createRedis(config, {
      maxRetriesPerRequest: 1,
      retryStrategy: () => null,
      sentinelRetryStrategy: () => null,
    });
    redis.on("error", () => {});
    await redis.connect();
  } catch (err) {
    throw new CommandError(`cannot reach Redis at ${where} (${(err as Error).message}): ${advice}`);
  }
  try {
    return await fn(redis);
  } finally {
    redis.disconnect();
  }
}
