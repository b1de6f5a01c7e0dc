/** Transactions in flight per destination domain in this process, capped at `limit`. */
export class DestinationLimiter {
  readonly limit: number;
  readonly #inFlight = new Map<string, number>();

  constructor(limit: number) {
    this.limit = limit;
  }

  /** Takes a slot for `domain`; false when the destination is at its limit. */
  tryAcquire(domain: string): boolean {
    const n = this.#inFlight.get(domain) ?? 0;
    if (n >= this.limit) return false;
    this.#inFlight.set(domain, n + 1);
    return true;
  }

  release(domain: string): void {
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
