// When to try a deferred recipient again, and when to give up (docs/architecture.md, retry policy).

export interface RetryPolicy {
  /** waits after attempt 1, 2, …; the last one repeats */
  schedule: readonly number[];
  /** fraction of each wait added or taken away at random */
  jitter: number;
  /** ms after acceptance when the message expires */
  lifetimeMs: number;
  /** ms after acceptance when a delay notice is due; 0 disables */
  delayWarningMs: number;
}

/** The wait after `attempt` failed, before jitter. */
export function baseInterval(policy: RetryPolicy, attempt: number): number {
  const s = policy.schedule;
  return s[Math.min(Math.max(attempt, 1), s.length) - 1] ?? 60_000;
}

export function expiresAt(policy: RetryPolicy, receivedAt: string): number {
  return Date.parse(receivedAt) + policy.lifetimeMs;
}

export function isExpired(policy: RetryPolicy, receivedAt: string, now: number): boolean {
  return now >= expiresAt(policy, receivedAt);
}

/**
 * When to make the attempt after `attempt`: the schedule's wait with jitter, but never later than
 * the expiry, so a message gives up on time instead of one long interval late.
 */
export function nextAttemptAt(
  policy: RetryPolicy,
  attempt: number,
  receivedAt: string,
  now: number,
  random: () => number = Math.random,
): number {
  const base = baseInterval(policy, attempt);
  const wait = base * (1 + (random() * 2 - 1) * policy.jitter);
  return Math.min(now + Math.max(0, Math.round(wait)), expiresAt(policy, receivedAt));
}

export function delayNoticeDue(policy: RetryPolicy, receivedAt: string, now: number): boolean {
  return policy.delayWarningMs > 0 && now - Date.parse(receivedAt) >= policy.delayWarningMs;
}
