import type { ByteLease } from "./intake.ts";

/**
 * The DATA bytes one process may hold in memory at once, across every session of every listener
 * that shares this object (msa's 587 and 465 do: `edgeLimits` makes one per call). Each message
 * is buffered in full until it is stored, so without this a few clients sending maximum-size
 * messages on every connection they are allowed could exhaust the pod's memory; with it, the
 * transaction that does not fit is refused with `452 4.3.1` and its bytes are dropped as they come.
 */
export class MemoryBudget {
  readonly limit: number;
  #used = 0;

  constructor(limit: number) {
    if (!Number.isFinite(limit) || limit <= 0) throw new RangeError(`memory budget ${limit} must be > 0`);
    this.limit = limit;
  }

  /** bytes held now */
  get used(): number {
    return this.#used;
  }

  /** whether this many more bytes fit now (the declared SIZE at MAIL FROM) */
  fits(bytes: number): boolean {
    return this.#used + bytes <= this.limit;
  }

  /** One transaction's share, taken chunk by chunk and given back in one go when it ends. */
  lease(): ByteLease {
    let held = 0;
    return {
      take: (bytes) => {
        if (!this.fits(bytes)) return false;
        this.#used += bytes;
        held += bytes;
        return true;
      },
      release: () => {
        this.#used -= held;
        held = 0;
      },
    };
  }
}
