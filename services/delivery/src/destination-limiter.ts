/**
 * Transactions in flight per destination domain in this process, capped at `limit`. A request
 * for a full destination may wait briefly for a slot (a fast destination frees one within
 * milliseconds); at most `maxWaiters` wait per destination, so a hung one cannot fill the worker.
 */
export class DestinationLimiter {
  readonly limit: number;
  readonly maxWaiters: number;
  readonly #inFlight = new Map<string, number>();
  readonly #waiters = new Map<string, ((ok: boolean) => void)[]>();

  constructor(limit: number, maxWaiters = limit) {
    this.limit = limit;
    this.maxWaiters = maxWaiters;
  }

  /** Takes a slot for `domain`, waiting up to `waitMs` for one; false when none came. */
  async acquire(domain: string, waitMs: number): Promise<boolean> {
    if (this.tryAcquire(domain)) return true;
    const queue = this.#waiters.get(domain) ?? [];
    if (waitMs <= 0 || queue.length >= this.maxWaiters) return false;
    this.#waiters.set(domain, queue);
    return new Promise<boolean>((resolve) => {
      const grant = (ok: boolean) => {
        clearTimeout(timer);
        resolve(ok);
      };
      const timer = setTimeout(() => {
        const i = queue.indexOf(grant);
        if (i >= 0) queue.splice(i, 1);
        if (queue.length === 0 && this.#waiters.get(domain) === queue) this.#waiters.delete(domain);
        resolve(false);
      }, waitMs);
      queue.push(grant);
    });
  }

  /** Takes a slot for `domain`; false when the destination is at its limit. */
  tryAcquire(domain: string): boolean {
    const n = this.#inFlight.get(domain) ?? 0;
    if (n >= this.limit) return false;
    this.#inFlight.set(domain, n + 1);
    return true;
  }

  release(domain: string): void {
    const queue = this.#waiters.get(domain);
    const next = queue?.shift();
    if (queue && queue.length === 0) this.#waiters.delete(domain);
    if (next) {
      next(true); // the slot passes straight to the first waiter
      return;
    }
    const n = this.#inFlight.get(domain) ?? 0;
    if (n <= 1) this.#inFlight.delete(domain);
    else this.#inFlight.set(domain, n - 1);
  }

  inFlight(domain: string): number {
    return this.#inFlight.get(domain) ?? 0;
  }
}

/** `ms` ± `fraction`, so requests sent back together do not all return at the same moment. */
export function jitter(ms: number, fraction = 0.2, random: () => number = Math.random): number {
  return Math.max(1, Math.round(ms * (1 - fraction + 2 * fraction * random())));
}
