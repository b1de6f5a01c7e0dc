// What the service sees of a connection and a transaction, and the policy hooks it brings.
import type { IncomingMessage } from "./intake.ts";

/** Who is connected, as the hooks see it. */
export interface EdgeClient {
  /** smtp-server's session id, for logs */
  sessionId: string;
  /** the client's IP (the one from the PROXY header behind a load balancer) */
  ip: string;
  port: number;
  /** reverse DNS name, when looked up and found */
  hostname: string | undefined;
  /** the EHLO/HELO argument ("" before one) */
  helo: string;
  esmtp: boolean;
  tls: { protocol: string; cipher: string } | undefined;
  /** the authenticated user (AUTH), when there is one */
  user: string | undefined;
}

/** One mail transaction (MAIL FROM … end of DATA), as the hooks see it. */
export interface Transaction {
  /** assigned at MAIL FROM; in every log line, span and event of the transaction, and in the 250 reply */
  readonly queueId: string;
  readonly client: EdgeClient;
  /** the reverse path with its domain normalised (A-label, lower case); "" for the null sender */
  readonly mailFrom: string;
  readonly mailFromArgs: Readonly<Record<string, string | true>>;
  /** recipients accepted so far, normalised, each once */
  readonly recipients: readonly string[];
  readonly smtputf8: boolean;
  readonly bodyType: "7BIT" | "8BITMIME";
  readonly startedAt: Date;
}

/** What the message hook decides for a message it accepts. */
export interface MessageDecision {
  /** header fields to put after our Received field and before the message, in order */
  prepend?: string[];
}

/**
 * The service's policy. Every hook may throw `SmtpError` to refuse (its reply goes to the client,
 * with its enhanced code); any other error is logged and answered `451 4.3.0`. Hooks run inside
 * the transaction's trace context, so logs carry the queue ID and trace ID.
 */
export interface EdgeHooks {
  /** after the connection limits passed, before the greeting */
  connect?(client: EdgeClient): Promise<void> | void;
  /** AUTH PLAIN/LOGIN (only offered when this hook is given): the user's identity, or undefined to refuse (535 5.7.8) */
  auth?(
    credentials: { method: string; username: string; password: string },
    client: EdgeClient,
  ): Promise<string | undefined> | string | undefined;
  mailFrom?(tx: Transaction): Promise<void> | void;
  /** may return the address to record instead (e.g. `postmaster` → `postmaster@example.test`) */
  rcptTo?(
    tx: Transaction,
    recipient: { address: string; args: Readonly<Record<string, string | true>> },
  ): Promise<string | undefined | void> | string | undefined | void;
  /** the message is read (size and loop checks passed); decide, and say what to prepend */
  message(
    tx: Transaction,
    message: IncomingMessage,
  ): Promise<MessageDecision | undefined | void> | MessageDecision | undefined | void;
  /**
   * The message is stored and queued; the 250 goes out once this settles. For bookkeeping (rate
   * counters): a failure here is logged and never changes the reply.
   */
  accepted?(tx: Transaction, accepted: { queueId: string; size: number }): Promise<void> | void;
}
