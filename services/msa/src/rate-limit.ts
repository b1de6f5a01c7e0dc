import type { Redis, Result } from "ioredis";
import { defineOnce } from "./redis-scripts.ts";

type Arg = string | number;

declare module "ioredis" {
  interface RedisCommander<Context> {
    msaRateCount(...args: Arg[]): Result<number, Context>;
    msaRateAdd(...args: Arg[]): Result<number, Context>;
  }
}

/*
 * A sliding-window log: one sorted set per user, a member per accepted message scored by the time
 * Redis gave it. Redis's own clock (TIME) keeps replicas with skewed clocks consistent.
 * KEYS[1] the user's set; ARGV[1] window ms (ARGV[2] the member, for add).
 */
const NOW = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
`;

const COUNT = `${NOW}
return redis.call('ZCARD', KEYS[1])
`;

const ADD = `${NOW}
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return redis.call('ZCARD', KEYS[1])
`;

export interface MessageRateOptions {
  /** messages per window per user (RATE_MESSAGES_PER_HOUR; 0 = no limit) */
  limit: number;
  windowMs: number;
  prefix?: string;
}

/**
 * Messages per user per sliding hour, shared by every replica. `allows()` runs at MAIL FROM and
 * `record()` when a message is accepted, so sessions of one user running at the same moment on
 * different replicas can pass the limit by at most one message each.
 */
export class MessageRateLimiter {
  readonly #redis: Redis;
  readonly #limit: number;
  readonly #windowMs: number;
  readonly #prefix: string;

  constructor(redis: Redis, { limit, windowMs, prefix = "mailpipe:msa:" }: MessageRateOptions) {
    this.#redis = redis;
    this.#limit = limit;
    this.#windowMs = windowMs;
    this.#prefix = prefix;
    defineOnce(redis, "msaRateCount", COUNT, 1);
    defineOnce(redis, "msaRateAdd", ADD, 1);
  }

  #key(user: string): string {
    return `${this.#prefix}rate:messages:${user.toLowerCase()}`;
  }

  /** Whether the user may start another message now. */
  async allows(user: string): Promise<boolean> {
    if (this.#limit <= 0) return true;
    return (await this.#redis.msaRateCount(this.#key(user), this.#windowMs)) < this.#limit;
  }

  /** Counts an accepted message (`id` makes each one a distinct member); returns the count in the window. */
  async record(user: string, id: string): Promise<number> {
    if (this.#limit <= 0) return 0;
    return this.#redis.msaRateAdd(this.#key(user), this.#windowMs, id);
  }
}
