import type { BodyRef, DsnNotify, Reply } from "@mailpipe/contracts";

export type RecipientState = "pending" | "delivered" | "bounced" | "expired";
export type FinalState = Exclude<RecipientState, "pending">;

/** One recipient of one message, as the router tracks it from routing to its final state. */
export interface RecipientRecord {
  /** stable id within the message: `l:<mailbox>`, `r:<address>` or `u:<address>` (never routed) */
  rid: string;
  /** position in the message (envelope order after expansion); lists come back in this order */
  seq: number;
  kind: "local" | "remote" | "none";
  /** the address delivered to (Final-Recipient); for local copies the Delivered-To address */
  address: string;
  /** the address the sender used, when different (alias, ORCPT) */
  original?: string;
  /** destination domain (remote) */
  domain?: string;
  /** mailbox owner and Maildir++ folder (local) */
  mailbox?: string;
  folder?: string;
  state: RecipientState;
  /** the attempt in progress or next to make (1 on the first try); statuses of other attempts are stale */
  attempt: number;
  lastReply?: Reply;
  remoteMta?: string;
  /** ISO time of the last attempt */
  lastAttemptAt?: string;
  /**
   * A remote address one of our aliases forwards to: the alias's domain. The envelope sender of its
   * copies is rewritten with SRS (when the directory configures it) so that SPF passes there.
   */
  forwardedBy?: string;
  /** RFC 3461 NOTIFY: report failures / delays / successes for this recipient */
  notifyFailure: boolean;
  notifyDelay: boolean;
  /** absent on records written before success notices existed (then: false) */
  notifySuccess?: boolean;
  /** NOTIFY as the sender gave it, when given: passed on to a next hop that has DSN */
  notify?: DsnNotify[];
}

/** What the router records about a message when it first routes it. */
export interface MessageInput {
  queueId: string;
  mailFrom: string;
  /** ISO time of acceptance */
  receivedAt: string;
  source: "mx" | "msa" | "dsn" | "report";
  body: BodyRef;
  /** the spool message (envelope, and the body when attached) to delete when the message is final */
  spool?: SpoolLocation;
  messageId?: string;
  /** W3C traceparent of the message's trace, so later attempts join it */
  traceparent?: string;
  smtputf8: boolean;
  bodyType: "7BIT" | "8BITMIME";
  /** set when the message is itself a DSN */
  dsn?: { of: string; kind: "failure" | "delay" | "success" };
  /** whether DSNs may be sent for this message (false for the null sender and for DSNs) */
  notices: boolean;
  /** RFC 3461 ENVID (decoded): the report's Original-Envelope-Id */
  envid?: string;
  /** RFC 3461 RET: what a failure report returns (absent: the headers) */
  ret?: "FULL" | "HDRS";
}

/** Where a spool message is stored. */
export interface SpoolLocation {
  stream: string;
  seq: number;
}

export interface MessageRecord extends MessageInput {
  delayNotified: boolean;
  /** recipients not final yet */
  open: number;
  total: number;
}

export interface MessageState {
  message: MessageRecord;
  recipients: RecipientRecord[];
}

export type CreateResult =
  /** the state was written now, or was there already (a redelivery): `recipients` is what Redis holds */
  | { status: "created" | "exists"; recipients: RecipientRecord[] }
  /** every recipient was final at once and nothing needs the body: the message is done */
  | { status: "finalized" }
  /** the message finished earlier (tombstone): nothing to do */
  | { status: "finished" };

/** Fields of a finished recipient besides its state. */
export interface OutcomePatch {
  lastReply: Reply;
  remoteMta?: string;
  lastAttemptAt: string;
}

export type FinishResult = (
  | { status: "missing" }
  | { status: "stale"; recipient: RecipientRecord }
  | {
      status: "ok";
      recipient: RecipientRecord;
      /** the message became final with this: its receivedAt (ISO) */
      finalized?: string;
      /** a DSN will report this recipient (a failure, or a success with NOTIFY=SUCCESS) */
      dsnQueued: boolean;
    }
) & {
  /** finishByAddress with a slot: waiting groups that got the released slot (due in the schedule now) */
  granted?: number;
};

export type ScheduleResult =
  | { status: "missing" }
  | { status: "stale"; recipient: RecipientRecord }
  | { status: "ok"; recipient: RecipientRecord; delayNoticeQueued: boolean };

interface Leased {
  /** job id: `<queueId>:<rid>` for retries, `<queueId>:dsn-failure|dsn-delay|gc` for tasks */
  id: string;
  /** the lease's token: complete() only removes the job while this lease holds it */
  lease: string;
  queueId: string;
}

/** A destination slot: the site (hash of its MX hosts) and the token that holds it. */
export interface SlotRef {
  site: string;
  token: string;
}

/** A slot and the request that went out with it (recorded so an expired lease can be checked). */
export interface SlotRequest extends SlotRef {
  /** the request's MAIL_DELIVER stream sequence and dispatch id (its Nats-Msg-Id) */
  seq: number;
  dispatchId: string;
}

export interface RetryJob extends Leased {
  kind: "retry";
  /** the recipient as it was when the retry was scheduled (attempt = the attempt to make) */
  recipient: RecipientRecord;
  receivedAt: string;
  traceparent?: string;
  /** set by an operator (mailctl): bounce with a DSN, or drop without one */
  mark?: "bounce" | "drop";
  /**
   * set by the watchdog (claimStale): the recipient's previous attempt was dispatched at this ISO
   * time and never reported; `recipient.attempt` is already the next one
   */
  stale?: { dispatchedAt: string };
  /**
   * set when the job waited for a destination slot and was granted one: the slot is held for it
   * (a lease), and its re-dispatch goes out with it
   */
  slot?: SlotRef;
}

export interface DsnJob extends Leased {
  kind: "dsn";
  dsnKind: "failure" | "delay";
  /** fields stored by prepareTask() on an earlier try */
  prepared: Record<string, string>;
}

export interface GcJob extends Leased {
  kind: "gc";
  /** the spool message to delete (absent for messages from the pre-spool work queue) */
  spool?: SpoolLocation;
  body: BodyRef;
}

export type ClaimedJob = RetryJob | DsnJob | GcJob;

/** One scheduled retry as mailctl lists it. */
export interface ScheduledEntry {
  /** job id, for deleteScheduled() */
  id: string;
  queueId: string;
  recipient: string;
  kind: "local" | "remote";
  /** destination domain (remote) or mailbox (local) */
  destination: string;
  /** attempts made so far */
  attempts: number;
  /** ISO time */
  nextAttemptAt: string;
  lastReply?: Reply;
  receivedAt: string;
  mark?: "bounce" | "drop";
  /** kept aside by `mailctl queue hold`: not dispatched until released */
  held?: boolean;
}

export interface QueueStats {
  /** retries waiting in the schedule */
  scheduled: number;
  /** jobs claimed by a router and not completed yet */
  inFlight: number;
  /** ISO time the next retry is due, null when none */
  oldestDueAt: string | null;
  /** ISO acceptance time of the oldest message not yet final, null when none */
  oldestReceivedAt: string | null;
}

/** A recipient the watchdog may take: waiting for a worker's result since `dispatchedAt`. */
export interface StaleCandidate {
  /** `<queueId>:<rid>`, for claimStale() and touchDispatched() */
  id: string;
  queueId: string;
  rid: string;
  /** ms */
  dispatchedAt: number;
  /** the MAIL_DELIVER stream sequence of its request, when recorded */
  seq?: number;
}
