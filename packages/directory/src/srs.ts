// The Sender Rewriting Scheme (SRS), as Mail::SRS and libsrs2 (postsrsd) write it, so that mail an
// alias forwards to another domain passes SPF there, and a bounce to the rewritten sender finds its
// way back:
//
//   alice@sender.test                  → SRS0=HHHH=TT=sender.test=alice@example.test
//   SRS0=HHHH=TT=sender.test=alice@fwd.test (another forwarder's)
//                                      → SRS1=GGGG=fwd.test==HHHH=TT=sender.test=alice@example.test
//
// HHHH is a keyed hash (HMAC-SHA1, base64, 4 characters) over the timestamp and the original address;
// TT is the day the address was made (days since 1970 modulo 1024, in base32). A bounce to an SRS0
// address is accepted only with a hash made by one of our secrets and within `maxAgeDays`; an SRS1
// address is checked by its hash and goes back to the forwarder that made its SRS0 part, which checks
// the rest. Hashes compare case-insensitively, as libsrs2 does, since some MTAs change the case of
// local parts. Written here rather than taken from npm: the SRS packages there are small, unmaintained
// one-author modules, and this is about 100 lines of HMAC and string handling.
import { createHmac, timingSafeEqual } from "node:crypto";

const BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const HASH_LENGTH = 4;
const DAY_MS = 86_400_000;
/** 10 bits of days: the timestamp wraps every 1024 days */
const TIME_SLOTS = 1024;

const SRS0 = /^srs0[=+-]([^=]+)=([^=]{2})=([^=]+)=(.+)$/i;
const SRS1 = /^srs1[=+-]([^=]+)=([^=]+)==(.+)$/i;

export interface SrsOptions {
  /** the first signs new addresses; every one is accepted in bounces (key rotation) */
  secrets: readonly string[];
  /** how long a rewritten address is accepted back, in days (default 21, as Mail::SRS) */
  maxAgeDays?: number;
}

export type SrsReverse =
  | { ok: true; address: string }
  | { ok: false; reason: "malformed" | "forged" | "expired" };

/** Whether a local part is an SRS address of any kind (SRS0 or SRS1). */
export function isSrsLocal(local: string): boolean {
  return /^srs[01][=+-]/i.test(local);
}

export class Srs {
  readonly #secrets: readonly string[];
  readonly #maxAgeDays: number;

  constructor(opts: SrsOptions) {
    if (opts.secrets.length === 0) throw new Error("SRS needs at least one secret");
    this.#secrets = opts.secrets;
    this.#maxAgeDays = opts.maxAgeDays ?? 21;
  }

  /**
   * The envelope sender to use when forwarding mail from `sender` out of `domain` (one of ours that
   * publishes SPF for us). The null sender stays null; an SRS address is wrapped into SRS1.
   */
  forward(sender: string, domain: string, now: number = Date.now()): string {
    if (sender === "") return "";
    const at = sender.lastIndexOf("@");
    if (at <= 0) return sender;
    const local = sender.slice(0, at);
    const host = sender.slice(at + 1);
    if (host.toLowerCase() === domain.toLowerCase()) return sender;
    const m1 = SRS1.exec(local);
    if (m1) {
      // already SRS1: keep its first forwarder and SRS0 part, sign them anew
      const [, , first, rest] = m1 as unknown as [string, string, string, string];
      return `SRS1=${this.#hash(this.#secrets[0]!, first, rest)}=${first}==${rest}@${domain}`;
    }
    const m0 = SRS0.exec(local);
    if (m0) {
      // an SRS0 of another forwarder: point back at it
      const rest = local.slice(5);
      return `SRS1=${this.#hash(this.#secrets[0]!, host, rest)}=${host}==${rest}@${domain}`;
    }
    const stamp = timestamp(now);
    return `SRS0=${this.#hash(this.#secrets[0]!, stamp, host, local)}=${stamp}=${host}=${local}@${domain}`;
  }

  /** The address an SRS local part stands for, if one of our secrets made it and it is not too old. */
  reverse(local: string, now: number = Date.now()): SrsReverse {
    const m1 = SRS1.exec(local);
    if (m1) {
      const [, hash, first, rest] = m1 as unknown as [string, string, string, string];
      if (!this.#valid(hash, [first, rest])) return { ok: false, reason: "forged" };
      return { ok: true, address: `SRS0=${rest}@${first}` };
    }
    const m0 = SRS0.exec(local);
    if (!m0) return { ok: false, reason: "malformed" };
    const [, hash, stamp, host, user] = m0 as unknown as [string, string, string, string, string];
    if (!this.#valid(hash, [stamp, host, user])) return { ok: false, reason: "forged" };
    const age = ageInDays(stamp, now);
    if (age === undefined || age > this.#maxAgeDays) return { ok: false, reason: "expired" };
    return { ok: true, address: `${user}@${host}` };
  }

  #hash(secret: string, ...parts: string[]): string {
    const mac = createHmac("sha1", secret);
    for (const p of parts) mac.update(p.toLowerCase());
    return mac.digest("base64").slice(0, HASH_LENGTH);
  }

  #valid(hash: string, parts: string[]): boolean {
    if (hash.length !== HASH_LENGTH) return false;
    const got = Buffer.from(hash.toLowerCase());
    return this.#secrets.some((s) =>
      timingSafeEqual(Buffer.from(this.#hash(s, ...parts).toLowerCase()), got),
    );
  }
}

function timestamp(now: number): string {
  const day = Math.floor(now / DAY_MS) % TIME_SLOTS;
  return BASE32[day >> 5]! + BASE32[day & 31]!;
}

/** Days since the stamp was made (the stamp wraps every 1024 days), or undefined if it is not one. */
function ageInDays(stamp: string, now: number): number | undefined {
  const hi = BASE32.indexOf(stamp[0]!.toUpperCase());
  const lo = BASE32.indexOf(stamp[1]!.toUpperCase());
  if (hi < 0 || lo < 0) return undefined;
  const made = (hi << 5) | lo;
  const today = Math.floor(now / DAY_MS) % TIME_SLOTS;
  return (today - made + TIME_SLOTS) % TIME_SLOTS;
}
