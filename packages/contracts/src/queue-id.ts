import { randomFillSync } from "node:crypto";
import { decodeTime } from "ulid";

/** Crockford's base32, as ULIDs use it. */
const ENCODING = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/**
 * Random bytes are taken from a pool filled 4 KiB at a time: the `ulid` package's generator asks
 * the kernel for randomness once per character (16 calls per id), which was 2% of mx's CPU.
 */
const pool = Buffer.alloc(4096);
let poolAt = pool.length;

function randomBytes10(): Buffer {
  if (poolAt + 10 > pool.length) {
    randomFillSync(pool);
    poolAt = 0;
  }
  const out = pool.subarray(poolAt, poolAt + 10);
  poolAt += 10;
  return out;
}

let lastTime = -1;
/** the random part of the last id, as 16 base32 digits */
const lastRandom = new Uint8Array(16);

/**
 * A new queue ID: a ULID (26 chars, Crockford base32), sortable by creation time and unique. Within
 * one millisecond the random part counts up from the first id's, so ids from one process stay in
 * creation order (the ULID spec's monotonic mode).
 */
export function newQueueId(now = Date.now()): string {
  if (now <= lastTime) {
    let i = 15;
    while (i >= 0 && lastRandom[i] === 31) lastRandom[i--] = 0;
    if (i < 0) throw new Error("queue id space of this millisecond exhausted");
    lastRandom[i]! += 1;
  } else {
    lastTime = now;
    const b = randomBytes10();
    // 80 bits → 16 digits of 5 bits, most significant first
    for (let d = 0; d < 16; d++) {
      const bit = d * 5;
      const byte = bit >> 3;
      const shift = bit & 7;
      const two = (b[byte]! << 8) | (byte + 1 < 10 ? b[byte + 1]! : 0);
      lastRandom[d] = (two >> (11 - shift)) & 31;
    }
  }
  let time = lastTime;
  let head = "";
  for (let i = 0; i < 10; i++) {
    head = ENCODING[time % 32]! + head;
    time = Math.floor(time / 32);
  }
  let tail = "";
  for (let d = 0; d < 16; d++) tail += ENCODING[lastRandom[d]!]!;
  return head + tail;
}

export const QUEUE_ID_PATTERN = /^[0-9A-HJKMNP-TV-Z]{26}$/;

export function isQueueId(value: string): boolean {
  return QUEUE_ID_PATTERN.test(value);
}

/** The creation time (ms since epoch) encoded in a queue ID. */
export function queueIdTime(queueId: string): number {
  return decodeTime(queueId);
}
