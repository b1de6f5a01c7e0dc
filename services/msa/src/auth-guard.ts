import type { Redis, Result } from "ioredis";
import { defineOnce } from "./redis-scripts.ts";

type Arg = string | number;

declare module "ioredis" {
  interface RedisCommander<Context> {
    msaAuthCheck(...args: Arg[]): Result<[number, number, number, number], Context>;
    msaAuthFailed(...args: Arg[]): Result<[number, number, number, number], Context>;
  }
}

/*
 * Every key carries the hash tag {msa-auth} so the scripts' keys share one slot (Redis Cluster).
 * KEYS: 1 IP failure count, 2 user failure count, 3 IP lock, 4 user lock.
 */

/** → { ip failures, user failures, ms left on the IP lock (or -2), ms left on the user lock (or -2) } */
const CHECK = `
local ip = tonumber(redis.call('GET', KEYS[1]) or '0')
local user = tonumber(redis.call('GET', KEYS[2]) or '0')
return { ip, user, redis.call('PTTL', KEYS[3]), redis.call('PTTL', KEYS[4]) }
`;

/**
 * Counts one failure for the IP and the user; a count lives AUTH_FAIL_WINDOW after its latest
 * failure. Reaching a limit sets the lock for AUTH_LOCKOUT and clears that count, so the lock's
 * end starts a fresh count. ARGV: window ms, IP limit, user limit, lockout ms.
 * → { ip failures, user failures, IP locked now (0/1), user locked now (0/1) }
 */
const FAILED = `
local window, limitIp, limitUser, lockout = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ip = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], window)
local user = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], window)
local lockedIp, lockedUser = 0, 0
if limitIp > 0 and ip >= limitIp then
  redis.call('SET', KEYS[3], '1', 'PX', lockout)
  redis.call('DEL', KEYS[1])
  lockedIp = 1
end
if limitUser > 0 and user >= limitUser then
  redis.call('SET', KEYS[4], '1', 'PX', lockout)
  redis.call('DEL', KEYS[2])
  lockedUser = 1
end
return { ip, user, lockedIp, lockedUser }
`;

export interface AuthGuardOptions {
  /** a failure counts this long after the latest one (AUTH_FAIL_WINDOW) */
  windowMs: number;
  /** failures before replies slow down (AUTH_FAIL_SLOWDOWN_AFTER) */
  slowdownAfter: number;
  /** added delay per failure beyond slowdownAfter */
  delayStepMs: number;
  /** the most a reply is delayed */
  maxDelayMs: number;
  /** failures from one IP that lock it out (AUTH_FAIL_LIMIT_IP; 0 = never) */
  limitIp: number;
  /** failures for one username that lock it out (AUTH_FAIL_LIMIT_USER; 0 = never) */
  limitUser: number;
  /** how long a lock lasts (AUTH_LOCKOUT) */
  lockoutMs: number;
  prefix?: string;
}

export interface Attempt {
  ip: string;
  username: string;
}

export type Verdict =
  | { locked: false; delayMs: number; failures: { ip: number; user: number } }
  | { locked: true; scope: "ip" | "user"; retryInMs: number };

export interface FailureResult {
  failures: { ip: number; user: number };
  /** what this failure locked, if anything */
  lockedNow: ("ip" | "user")[];
}

/** The key part for a username: case-folded, trimmed and bounded, since anyone can send any name. */
export function usernameKey(username: string): string {
  return username.trim().toLowerCase().slice(0, 320);
}

/**
 * Brute-force protection shared by every msa replica through Redis: failed logins are counted per
 * client IP and per username; past a threshold each reply is delayed, past a limit the IP or the
 * username is locked out for a while, whatever password comes next.
 */
export class AuthGuard {
  readonly #redis: Redis;
  readonly #o: Required<AuthGuardOptions>;

  constructor(redis: Redis, options: AuthGuardOptions) {
    this.#redis = redis;
    this.#o = { prefix: "mailpipe:msa:", ...options };
    defineOnce(redis, "msaAuthCheck", CHECK, 4);
    defineOnce(redis, "msaAuthFailed", FAILED, 4);
  }

  #keys({ ip, username }: Attempt): [string, string, string, string] {
    const p = `${this.#o.prefix}{msa-auth}:`;
    const user = usernameKey(username);
    return [`${p}fail:ip:${ip}`, `${p}fail:user:${user}`, `${p}lock:ip:${ip}`, `${p}lock:user:${user}`];
  }

  /** The delay for the next reply after this many failures. */
  delayFor(failures: number): number {
    const extra = failures - this.#o.slowdownAfter + 1;
    if (extra <= 0) return 0;
    return Math.min(extra * this.#o.delayStepMs, this.#o.maxDelayMs);
  }

  /** Before checking a password: is the IP or the username locked, and how long to hold the reply. */
  async check(attempt: Attempt): Promise<Verdict> {
    const [ip, user, ipLockMs, userLockMs] = await this.#redis.msaAuthCheck(...this.#keys(attempt));
    if (userLockMs > 0) return { locked: true, scope: "user", retryInMs: userLockMs };
    if (ipLockMs > 0) return { locked: true, scope: "ip", retryInMs: ipLockMs };
    return { locked: false, delayMs: this.delayFor(Math.max(ip, user)), failures: { ip, user } };
  }

  async failed(attempt: Attempt): Promise<FailureResult> {
    const o = this.#o;
    const [ip, user, lockedIp, lockedUser] = await this.#redis.msaAuthFailed(
      ...this.#keys(attempt),
      o.windowMs,
      o.limitIp,
      o.limitUser,
      o.lockoutMs,
    );
    const lockedNow: ("ip" | "user")[] = [];
    if (lockedIp) lockedNow.push("ip");
    if (lockedUser) lockedNow.push("user");
    return { failures: { ip, user }, lockedNow };
  }

  /** A good login clears the username's count; the IP's stays, so one valid account cannot reset it. */
  async succeeded(attempt: Attempt): Promise<void> {
    await this.#redis.del(this.#keys(attempt)[1]);
  }
}
