import { decodeTime, monotonicFactory } from "ulid";

const next = monotonicFactory();

/** A new queue ID: a ULID (26 chars, Crockford base32), sortable by creation time and unique. */
export function newQueueId(now = Date.now()): string {
  return next(now);
}

export const QUEUE_ID_PATTERN = /^[0-9A-HJKMNP-TV-Z]{26}$/;

export function isQueueId(value: string): boolean {
  return QUEUE_ID_PATTERN.test(value);
}

/** The creation time (ms since epoch) encoded in a queue ID. */
export function queueIdTime(queueId: string): number {
  return decodeTime(queueId);
}
