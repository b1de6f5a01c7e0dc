import { createHash } from "node:crypto";
import { z } from "zod";
import { Address, Domain, ReversePath } from "./address.ts";
import { AttachedBody, BodyRef, ObjectBodyRef } from "./body-ref.ts";
import { QUEUE_ID_PATTERN } from "./queue-id.ts";
import { Reply } from "./smtp-reply.ts";

export const QueueId = z.string().regex(QUEUE_ID_PATTERN, "must be a queue ID (26-char ULID)");
const Timestamp = z.iso.datetime({ offset: true });
const Attempt = z.number().int().min(1).max(100_000);

export const DsnNotify = z.enum(["NEVER", "SUCCESS", "FAILURE", "DELAY"]);
export type DsnNotify = z.infer<typeof DsnNotify>;

/** One envelope recipient as the client gave it (and the address it was first addressed to). */
export const EnvelopeRecipient = z.strictObject({
  address: Address,
  /** the original recipient (RFC 3461 ORCPT, or the address before alias expansion) */
  original: Address.optional(),
  notify: z.array(DsnNotify).min(1).optional(),
});
export type EnvelopeRecipient = z.infer<typeof EnvelopeRecipient>;

/** RFC 3461 MAIL parameters: RET and ENVID (decoded from xtext). Absent on mail queued before them. */
export const EnvelopeDsn = z.strictObject({
  ret: z.enum(["FULL", "HDRS"]).optional(),
  /** printable ASCII, at most 100 characters (RFC 3461 4.4) */
  envid: z
    .string()
    .min(1)
    .max(100)
    .regex(/^[\x20-\x7e]+$/, "must be printable ASCII")
    .optional(),
});
export type EnvelopeDsn = z.infer<typeof EnvelopeDsn>;

export const Envelope = z.strictObject({
  mailFrom: ReversePath,
  rcptTo: z.array(EnvelopeRecipient).min(1).max(10_000),
  smtputf8: z.boolean(),
  bodyType: z.enum(["7BIT", "8BITMIME"]),
  dsn: EnvelopeDsn.optional(),
});
export type Envelope = z.infer<typeof Envelope>;

export const ClientInfo = z.strictObject({
  ip: z.string().min(1).max(64),
  helo: z.string().max(255),
  tls: z.boolean(),
  /** the authenticated user (msa only) */
  user: z.string().max(320).optional(),
});

/**
 * `mail.v1.spool`: a message accepted and durable, waiting to be routed. A body that fits travels
 * as the message's attachment (`{ attached: true }`), else it is in the Object Store.
 */
export const QueuedMail = z.strictObject({
  v: z.literal(1),
  queueId: QueueId,
  /** report: a TLS-RPT aggregate report (delivery publishes it) */
  source: z.enum(["mx", "msa", "dsn", "report"]),
  receivedAt: Timestamp,
  envelope: Envelope,
  body: z.union([AttachedBody, ObjectBodyRef]),
  client: ClientInfo.optional(),
  /** the header Message-ID, for tracking */
  messageId: z.string().max(998).optional(),
  /** set on DSNs: which message and which kind of report */
  dsn: z.strictObject({ of: QueueId, kind: z.enum(["failure", "delay", "success"]) }).optional(),
});
export type QueuedMail = z.infer<typeof QueuedMail>;

/** `mail.v1.deliver.local`: recipients whose mailbox is on this system. */
export const LocalDeliveryRequest = z.strictObject({
  v: z.literal(1),
  queueId: QueueId,
  /** unique per dispatch; also the publish's Nats-Msg-Id */
  dispatchId: z.string().min(1).max(256),
  receivedAt: Timestamp,
  mailFrom: ReversePath,
  recipients: z
    .array(
      z.strictObject({
        /** the mailbox owner, `user@domain` after alias and plus-address resolution */
        mailbox: Address,
        /** the envelope recipient this copy is for (Delivered-To) */
        address: Address,
        /** Maildir++ subfolder (from a +tag), when the mailbox has one */
        folder: z
          .string()
          .regex(/^[A-Za-z0-9_-]{1,64}$/)
          .optional(),
        attempt: Attempt,
      }),
    )
    .min(1),
  body: BodyRef,
});
export type LocalDeliveryRequest = z.infer<typeof LocalDeliveryRequest>;

export const MxHost = z.strictObject({
  exchange: z.string().min(1).max(253),
  priority: z.number().int().min(0).max(65535),
  /** resolved addresses, in the order to try them */
  addresses: z.array(z.string().min(2).max(64)).min(1),
});
export type MxHost = z.infer<typeof MxHost>;

/**
 * A destination slot (cluster-wide destination limits): the site (a digest of the destination's MX
 * host names) and the token the router took the slot under. A status names it to release it.
 */
export const SlotRef = z.strictObject({
  site: z.string().regex(/^[0-9a-f]{16}$/, "must be a site id (16 hex digits)"),
  token: z.string().min(1).max(300),
});
export type SlotRef = z.infer<typeof SlotRef>;

/** The slot a request goes out with: the worker renews it while its transaction runs. */
export const RequestSlot = SlotRef.extend({
  /** when the slot's lease runs out (ms since the epoch) unless renewed */
  until: z.number().int().positive(),
  /** how long a renewal extends it (ms) */
  leaseMs: z.number().int().positive(),
});
export type RequestSlot = z.infer<typeof RequestSlot>;

/** `mail.v1.deliver.remote.<dest>`: one SMTP transaction's worth of recipients for one destination. */
export const RemoteDeliveryRequest = z.strictObject({
  v: z.literal(1),
  queueId: QueueId,
  dispatchId: z.string().min(1).max(256),
  receivedAt: Timestamp,
  mailFrom: ReversePath,
  destination: z.strictObject({
    domain: Domain,
    /** MX hosts in the order to try them (router resolved them) */
    hosts: z.array(MxHost).min(1),
  }),
  recipients: z
    .array(
      z.strictObject({
        address: Address,
        /** the address the sender used (ORCPT, or the alias): relayed as ORCPT */
        original: Address.optional(),
        /** the sender's RFC 3461 NOTIFY for this recipient: relayed when the next hop has DSN */
        notify: z.array(DsnNotify).min(1).optional(),
        attempt: Attempt,
      }),
    )
    .min(1)
    .max(1000),
  smtputf8: z.boolean(),
  bodyType: z.enum(["7BIT", "8BITMIME"]),
  /** the sender's RFC 3461 RET and ENVID: relayed when the next hop has DSN */
  dsn: EnvelopeDsn.optional(),
  body: BodyRef,
  /** the destination slot the router took for this transaction (absent: no limit applies) */
  slot: RequestSlot.optional(),
});
export type RemoteDeliveryRequest = z.infer<typeof RemoteDeliveryRequest>;

export const Outcome = z.enum(["delivered", "deferred", "bounced"]);
export type Outcome = z.infer<typeof Outcome>;

/**
 * The Nats-Msg-Id of a status: one per (dispatch, recipient, outcome). The address is hashed, so
 * no local part lands in message ids and the spans that carry them.
 */
export function statusMsgId(dispatchId: string, address: string, outcome: Outcome): string {
  const h = createHash("sha256").update(address.toLowerCase()).digest("hex").slice(0, 16);
  return `${dispatchId}:${h}:${outcome}`;
}

/** `mail.v1.status.<outcome>`: what happened to one recipient on one attempt. */
export const RecipientStatus = z.strictObject({
  v: z.literal(1),
  queueId: QueueId,
  dispatchId: z.string().min(1).max(256),
  recipient: Address,
  outcome: Outcome,
  reply: Reply,
  attempt: Attempt,
  service: z.enum(["delivery", "mda"]),
  at: Timestamp,
  /** the host that gave the reply (remote) or the mailbox path's owner (local) */
  remoteMta: z.string().max(300).optional(),
  destination: Domain.optional(),
  /** the request's destination slot: the router releases it with this status */
  slot: SlotRef.optional(),
  /**
   * delivered, with NOTIFY=SUCCESS, to a next hop that advertised DSN and got the sender's
   * NOTIFY/ORCPT/RET/ENVID passed on: the success notice is the next hop's to send (RFC 3461
   * 5.2.1), not ours. Set only for recipients that asked for success notices.
   */
  dsnRelayed: z.literal(true).optional(),
});
export type RecipientStatus = z.infer<typeof RecipientStatus>;

export const EVENT_TYPES = [
  "received",
  "rejected",
  "queued",
  "routed",
  "attempt",
  "delivered",
  "deferred",
  "bounced",
  "expired",
  "delayed",
  "dsn",
  "held",
  "filtered",
] as const;
export const EventType = z.enum(EVENT_TYPES);
export type EventType = z.infer<typeof EventType>;

export const ServiceName = z.enum(["msa", "mx", "router", "delivery", "mda", "mailctl"]);
export type ServiceName = z.infer<typeof ServiceName>;

/**
 * What the content filter (rspamd) said about a message: its action (rspamd's names, plus
 * `skipped` for a message over FILTER_MAX_SIZE and `failed` when it did not answer), its score and
 * threshold, and the names of the symbols that scored most (never message content).
 */
export const FILTER_ACTIONS = [
  "no action",
  "greylist",
  "add header",
  "rewrite subject",
  "soft reject",
  "reject",
  "skipped",
  "failed",
] as const;
export const FilterAction = z.enum(FILTER_ACTIONS);
export type FilterAction = z.infer<typeof FilterAction>;
export const FilterVerdict = z.strictObject({
  action: FilterAction,
  score: z.number().finite().optional(),
  required: z.number().finite().optional(),
  symbols: z.array(z.string().max(128)).max(20).optional(),
});
export type FilterVerdict = z.infer<typeof FilterVerdict>;

/** `mail.v1.events.<type>`: every state change, for tracking, metrics and webhooks. */
export const MailEvent = z.strictObject({
  v: z.literal(1),
  type: EventType,
  at: Timestamp,
  service: ServiceName,
  queueId: QueueId.optional(),
  traceId: z
    .string()
    .regex(/^[0-9a-f]{32}$/)
    .optional(),
  messageId: z.string().max(998).optional(),
  mailFrom: ReversePath.optional(),
  recipient: Address.optional(),
  recipients: z.array(Address).max(10_000).optional(),
  destination: Domain.optional(),
  remoteMta: z.string().max(300).optional(),
  attempt: Attempt.optional(),
  reply: Reply.optional(),
  client: z.strictObject({ ip: z.string().max(64), helo: z.string().max(255).optional() }).optional(),
  size: z.number().int().nonnegative().optional(),
  /** outbound: the TLS policy applied to the session and what it negotiated */
  tls: z
    .strictObject({
      /** none | opportunistic | required | verify | dane */
      policy: z.string().max(40),
      /** where the policy came from: default | config | mta-sts | dane */
      source: z.string().max(40),
      version: z.string().max(40).optional(),
      cipher: z.string().max(200).optional(),
      /** the certificate verified for the MX name (or matched its TLSA records) */
      verified: z.boolean().optional(),
    })
    .optional(),
  /** a short human-readable note, never message content */
  detail: z.string().max(1000).optional(),
  /** `filtered`: the content filter's verdict */
  filter: FilterVerdict.optional(),
});
export type MailEvent = z.infer<typeof MailEvent>;
