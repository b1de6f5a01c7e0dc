import type { Dirent } from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { join } from "node:path";

/** Maildir++ puts the size in the name (`,S=<bytes>`), so usage is mostly a readdir, not a stat per file. */
const SIZE_IN_NAME = /,S=(\d+)(?=[,:]|$)/;

async function entries(dir: string): Promise<Dirent[]> {
  try {
    return await readdir(dir, { withFileTypes: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
}

/** Bytes of the messages in new/ and cur/ of a Maildir and of its Maildir++ folders (`.<name>`). */
export async function maildirUsage(maildir: string): Promise<number> {
  const folders = [maildir];
  for (const e of await entries(maildir)) {
    if (e.isDirectory() && e.name.startsWith(".") && e.name !== "." && e.name !== "..") {
      folders.push(join(maildir, e.name));
    }
  }
  let bytes = 0;
  for (const folder of folders) {
    for (const sub of ["new", "cur"]) {
      const dir = join(folder, sub);
      for (const e of await entries(dir)) {
        if (e.name.startsWith(".")) continue;
        const m = SIZE_IN_NAME.exec(e.name);
        if (m) {
          bytes += Number(m[1]);
          continue;
        }
        // Dovecot (or a user) may move or expunge it meanwhile: then it no longer counts
        bytes += await stat(join(dir, e.name)).then(
          (s) => (s.isFile() ? s.size : 0),
          () => 0,
        );
      }
    }
  }
  return bytes;
}

interface Usage {
  bytes: number;
  expires: number;
}

/**
 * Per-mailbox usage, counted from disk at most every `cacheMs` and bumped by what this process writes
 * meanwhile. A reservation is taken before writing, so concurrent deliveries to one mailbox cannot
 * both squeeze under the quota; it is released when the write fails.
 */
export class QuotaTracker {
  readonly #cacheMs: number;
  readonly #usage = new Map<string, Usage>();
  readonly #scans = new Map<string, Promise<Usage>>();
  readonly #scan: (maildir: string) => Promise<number>;

  constructor(opts: { cacheMs?: number; scan?: (maildir: string) => Promise<number> } = {}) {
    this.#cacheMs = opts.cacheMs ?? 5000;
    this.#scan = opts.scan ?? maildirUsage;
  }

  /** Reserves `size` bytes under `quota` (undefined = unlimited); false when they do not fit. */
  async reserve(maildir: string, quota: number | undefined, size: number): Promise<boolean> {
    if (quota === undefined) return true;
    const usage = await this.#current(maildir);
    if (usage.bytes + size > quota) return false;
    usage.bytes += size;
    return true;
  }

  /** Gives back a reservation whose write failed. */
  release(maildir: string, quota: number | undefined, size: number): void {
    if (quota === undefined) return;
    const usage = this.#usage.get(maildir);
    if (usage) usage.bytes = Math.max(0, usage.bytes - size);
  }

  #prune(): void {
    const now = Date.now();
    for (const [key, usage] of this.#usage) if (usage.expires <= now) this.#usage.delete(key);
  }

  async #current(maildir: string): Promise<Usage> {
    const cached = this.#usage.get(maildir);
    if (cached && cached.expires > Date.now()) return cached;
    let scan = this.#scans.get(maildir);
    if (!scan) {
      scan = this.#scan(maildir)
        .then((bytes) => {
          const usage = { bytes, expires: Date.now() + this.#cacheMs };
          if (this.#usage.size >= 10_000) this.#prune();
          this.#usage.set(maildir, usage);
          return usage;
        })
        .finally(() => this.#scans.delete(maildir));
      this.#scans.set(maildir, scan);
    }
    return scan;
  }
}
