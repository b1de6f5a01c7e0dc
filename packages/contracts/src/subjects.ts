import { createHash } from "node:crypto";
import { normalizeDomain } from "./address.ts";
import type { EventType, Outcome } from "./messages.ts";
import { EVENT_TYPES } from "./messages.ts";

const TOKEN = /^[A-Za-z0-9_-]{1,128}$/;

export class SubjectError extends Error {
  override name = "SubjectError";
}

/** Checks that a value is safe as one subject token (no dots, wildcards or spaces). */
export function token(value: string, what = "token"): string {
  if (!TOKEN.test(value)) {
    throw new SubjectError(
      `${what} ${JSON.stringify(value)} cannot be a subject token (allowed: A-Z a-z 0-9 _ -)`,
    );
  }
  return value;
}

/**
 * A destination domain as one subject token. Normalised domains hold only [a-z0-9.-], so mapping
 * `.` to `_` is reversible and keeps the token readable in `nats stream view`.
 */
export function destinationToken(domain: string): string {
  const ascii = normalizeDomain(domain);
  if (!ascii) throw new SubjectError(`${JSON.stringify(domain)} is not a domain name`);
  return token(ascii.replaceAll(".", "_"), "destination");
}

export function destinationFromToken(tok: string): string {
  return token(tok, "destination").replaceAll("_", ".");
}

const OUTCOMES: readonly Outcome[] = ["delivered", "deferred", "bounced"];

/** Every subject is built here; services never write one as a string literal. */
export const subjects = {
  /** accepted messages: envelope and (small) body in one message, kept until every recipient is final */
  queued: () => "mail.v1.spool",
  /** where releases before the spool published; the router drains it after an upgrade */
  queuedLegacy: () => "mail.v1.queued",
  deliverLocal: () => "mail.v1.deliver.local",
  deliverRemote: (domain: string) => `mail.v1.deliver.remote.${destinationToken(domain)}`,
  deliverRemoteAll: () => "mail.v1.deliver.remote.>",
  deliverAll: () => "mail.v1.deliver.>",
  status: (outcome: Outcome) => {
    if (!OUTCOMES.includes(outcome)) throw new SubjectError(`unknown outcome ${JSON.stringify(outcome)}`);
    return `mail.v1.status.${outcome}`;
  },
  statusAll: () => "mail.v1.status.>",
  /**
   * Where an event is published: `mail.v1.events.<bucket of its queue id>` (`_` for an event of no
   * message). One message's events are then a read of one literal subject, which the server answers
   * from its per-subject index without a scan, and the number of subjects stays bounded (65,536
   * buckets) however many messages the stream keeps.
   */
  event: (type: EventType, queueId?: string) => {
    if (!EVENT_TYPES.includes(type)) throw new SubjectError(`unknown event type ${JSON.stringify(type)}`);
    return queueId ? `mail.v1.events.${trackBucket(queueId)}` : "mail.v1.events._";
  },
  /** the subject holding one message's events (with other messages' of the same bucket) */
  eventsOfMessage: (queueId: string) => `mail.v1.events.${trackBucket(queueId)}`,
  eventsAll: () => "mail.v1.events.>",
  /**
   * The tracking index, in MAIL_EVENTS beside the events (same retention): one entry per key a
   * message is looked up by, `<key hash> <queue id>` as payload, on the key's bucket. `kind` is `mid`
   * (Message-ID) or `addr` (sender and recipient addresses).
   */
  trackIndex: (kind: "mid" | "addr", key: string) =>
    `mail.v1.track.${kind}.${trackBucket(trackHash(kind, key))}`,
  trackAll: () => "mail.v1.track.>",
} as const;

/** Stream, consumer and bucket names: the bus creates them, services bind to them by these names. */
export const topology = {
  streams: {
    /**
     * The spool: a message stays until the router deletes it, when its last recipient is final
     * (limits retention, discard new; BODY_TTL is the backstop age).
     */
    queued: { name: "MAIL_SPOOL", subjects: [subjects.queued()], kind: "spool" },
    deliver: { name: "MAIL_DELIVER", subjects: [subjects.deliverAll()], kind: "workqueue" },
    status: { name: "MAIL_STATUS", subjects: [subjects.statusAll()], kind: "workqueue" },
    events: { name: "MAIL_EVENTS", subjects: [subjects.eventsAll(), subjects.trackAll()], kind: "limits" },
  },
  consumers: {
    router: { stream: "MAIL_SPOOL", durable: "router", filter: subjects.queued() },
    /** bound only while the pre-spool work queue still exists (an upgraded deployment) */
    routerLegacy: { stream: "MAIL_QUEUED", durable: "router", filter: subjects.queuedLegacy() },
    routerStatus: { stream: "MAIL_STATUS", durable: "router-status", filter: subjects.statusAll() },
    delivery: { stream: "MAIL_DELIVER", durable: "delivery", filter: subjects.deliverRemoteAll() },
    mda: { stream: "MAIL_DELIVER", durable: "mda", filter: subjects.deliverLocal() },
  },
  bodyBucket: "mail-bodies",
  /** the pre-spool work queue of accepted messages; never created any more, only drained */
  legacyQueued: { name: "MAIL_QUEUED", subjects: [subjects.queuedLegacy()], kind: "workqueue" },
} as const;

export type StreamKey = keyof typeof topology.streams;
export type ConsumerKey = keyof typeof topology.consumers;

/**
 * A lookup key's hash, as index entries carry it: SHA-256 (base64url, 128 bits) of the Message-ID as
 * written, or of the address in lower case.
 */
export function trackHash(kind: "mid" | "addr", key: string): string {
  const k = kind === "addr" ? key.trim().toLowerCase() : key.trim();
  return createHash("sha256").update(k).digest("base64url").slice(0, 22);
}

/** One of 65,536 buckets (4 hex digits of SHA-256), a subject token. */
export function trackBucket(value: string): string {
  return createHash("sha256").update(value).digest("hex").slice(0, 4);
}
