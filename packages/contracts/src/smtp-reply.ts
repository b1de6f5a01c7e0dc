import { z } from "zod";

/** An SMTP reply: basic code, RFC 3463 enhanced status code, and text. */
export const Reply = z.strictObject({
  code: z.number().int().min(200).max(599),
  enhanced: z.string().regex(/^[245]\.\d{1,3}\.\d{1,3}$/),
  text: z.string().max(4000),
});
export type Reply = z.infer<typeof Reply>;

export function reply(code: number, enhanced: string, text: string): Reply {
  return { code, enhanced, text };
}

export function formatReply(r: Reply): string {
  return `${r.code} ${r.enhanced} ${r.text}`;
}

/**
 * A reply read off the wire from another server: takes the enhanced code from the text when the
 * peer gave one, else the class default (`4.0.0` / `5.0.0`), as RFC 3464 Status needs one.
 */
export function parseRemoteReply(code: number, text: string): Reply {
  const flat = text.replace(/\r?\n/g, " ").trim();
  const m = /^([245])\.(\d{1,3})\.(\d{1,3})\s*(.*)$/s.exec(flat);
  const cls = String(Math.floor(code / 100));
  if (m && m[1] === cls)
    return { code, enhanced: `${m[1]}.${m[2]}.${m[3]}`, text: (m[4] ?? "").slice(0, 4000) };
  return { code, enhanced: `${cls}.0.0`, text: flat.slice(0, 4000) };
}

export const isPermanent = (r: Reply): boolean => r.code >= 500;
export const isTemporary = (r: Reply): boolean => r.code >= 400 && r.code < 500;

/**
 * The error a policy hook throws to refuse something. smtp-server sends `responseCode` and
 * `message`; the edge package makes the message's leading enhanced code the one on the wire.
 */
export class SmtpError extends Error {
  readonly responseCode: number;
  readonly reply: Reply;
  constructor(r: Reply, options?: { cause?: unknown }) {
    super(`${r.enhanced} ${r.text}`, options);
    this.name = "SmtpError";
    this.responseCode = r.code;
    this.reply = r;
  }
}

/** Named constructors: every reply the project sends is built here, so they stay consistent. */
export const replies = {
  accepted: (queueId: string) => reply(250, "2.0.0", `OK: queued as ${queueId}`),
  delivered: (detail = "Delivered") => reply(250, "2.0.0", detail),

  // addressing
  noSuchUser: (address?: string) =>
    reply(550, "5.1.1", address ? `<${address}>: no such user here` : "No such user here"),
  /** a bounce or reply to a rewritten (SRS) sender whose hash is not ours, or that is too old */
  srsInvalid: (reason: "forged" | "expired" | "malformed") =>
    reply(
      550,
      "5.1.1",
      reason === "expired"
        ? "This forwarding address (SRS) has expired: no such user here"
        : "This forwarding address (SRS) is not valid here: no such user here",
    ),
  relayDenied: () => reply(550, "5.7.1", "Relay access denied: we accept mail only for our own domains"),
  badRecipientSyntax: () => reply(501, "5.1.3", "Bad recipient address syntax"),
  badSenderSyntax: () => reply(501, "5.1.7", "Bad sender address syntax"),
  /** a malformed RFC 3461 parameter (ENVID, ORCPT, NOTIFY, RET) */
  badDsnParameter: (detail: string) => reply(501, "5.5.4", detail),
  domainNotFound: (domain: string) => reply(550, "5.1.2", `Host or domain name not found: ${domain}`),
  nullMx: (domain: string) => reply(556, "5.1.10", `Domain ${domain} does not accept mail (null MX)`),
  aliasLoop: (address: string) => reply(554, "5.4.6", `Alias loop detected while expanding <${address}>`),
  mailLoop: () => reply(554, "5.4.6", "Too many hops: mail loop detected"),

  // limits
  tooManyRecipients: () => reply(452, "4.5.3", "Too many recipients"),
  messageTooBig: (limit: number) => reply(552, "5.3.4", `Message exceeds the maximum size of ${limit} bytes`),
  headerTooBig: (limit: number) =>
    reply(552, "5.3.4", `Message header exceeds the maximum of ${limit} bytes`),
  mailboxFull: (address?: string) =>
    reply(452, "4.2.2", address ? `<${address}>: mailbox is full` : "Mailbox is full"),
  mailboxFullPermanent: (address?: string) =>
    reply(552, "5.2.2", address ? `<${address}>: mailbox is full` : "Mailbox is full"),
  tooManyConnections: () => reply(421, "4.7.0", "Too many connections from your address, try again later"),
  rateLimited: (what = "Message rate limit exceeded") => reply(450, "4.7.1", `${what}, try again later`),
  recipientRateLimited: () => reply(452, "4.5.3", "Too many recipients for this message"),

  // authentication and policy
  authRequired: () => reply(530, "5.7.0", "Authentication required"),
  tlsRequired: () => reply(530, "5.7.0", "Must issue a STARTTLS command first"),
  authFailed: () => reply(535, "5.7.8", "Authentication credentials invalid"),
  authLockedOut: () => reply(454, "4.7.0", "Too many failed authentication attempts, try again later"),
  authLockedOutClose: () =>
    reply(421, "4.7.0", "Too many failed authentication attempts, closing connection"),
  /** the brute-force store did not answer: refuse the login for now rather than go unguarded */
  authUnavailable: () => reply(454, "4.7.0", "Temporary authentication failure, try again later"),
  nullSenderRefused: () => reply(553, "5.7.1", "The null sender <> cannot be used to submit mail"),
  noFromHeader: () => reply(550, "5.6.0", "Message has no From header field: add one and send again"),
  manyFromHeaders: () =>
    reply(550, "5.6.0", "Message has more than one From header field (RFC 5322 allows one)"),
  badFromHeader: () => reply(550, "5.6.0", "The From header field holds no usable address"),
  senderNotOwned: (address: string) => reply(553, "5.7.1", `Sender address <${address}> is not owned by you`),
  dmarcReject: (domain: string) =>
    reply(550, "5.7.1", `Message rejected: DMARC policy of ${domain} says reject and the message failed it`),
  spfReject: (domain: string) =>
    reply(550, "5.7.23", `SPF check failed for ${domain}: your IP is not allowed`),
  /** the content filter (rspamd) says reject; `text` is its message, already sanitised */
  contentRejected: (text = "Message rejected as spam") => reply(550, "5.7.1", text),
  /** the content filter says soft reject or greylist */
  contentDeferred: (text = "Message deferred by the content filter, try again later") =>
    reply(451, "4.7.1", text),
  /** the content filter did not answer (down, slow, or an answer we could not read) */
  filterUnavailable: () => reply(451, "4.7.1", "Content filter unavailable, try again later"),

  // temporary problems on our side
  localError: () => reply(451, "4.3.0", "Temporary local problem, please try again later"),
  insufficientStorage: () => reply(452, "4.3.1", "Insufficient system storage"),
  shuttingDown: () => reply(421, "4.3.2", "Service shutting down, try again later"),
  timeout: () => reply(421, "4.4.2", "Timeout, closing connection"),

  // outcomes of delivery attempts (our side of a remote exchange)
  dnsTempFail: (domain: string) => reply(451, "4.4.3", `Temporary DNS failure looking up ${domain}`),
  connectionFailed: (detail: string) => reply(451, "4.4.1", `Could not connect: ${detail}`),
  connectionLost: (detail: string) => reply(451, "4.4.2", `Connection lost: ${detail}`),
  expired: (detail = "Delivery time expired, giving up") => reply(554, "5.4.7", detail),
  /** no worker ever reported on an attempt (the router's STALE_DISPATCH watchdog) */
  noDeliveryResult: (retrying = false) =>
    reply(
      451,
      "4.4.7",
      retrying ? "No delivery result reported, trying again" : "No delivery result reported",
    ),
  tlsFailed: (detail: string) => reply(451, "4.7.5", `TLS negotiation failed: ${detail}`),
  /** the destination's TLS policy requires TLS and the host did not offer STARTTLS (as Postfix says it) */
  outboundTlsRequired: (exchange: string, policy: string) =>
    reply(451, "4.7.4", `TLS is required (${policy}), but was not offered by ${exchange}`),
  /** the policy requires a verified certificate (or a DANE match) and this one is not */
  tlsNotVerified: (exchange: string, policy: string, detail: string) =>
    reply(451, "4.7.5", `Server certificate of ${exchange} not verified (${policy}): ${detail}`),
  /** MTA-STS enforce: this MX host is not one the domain's policy names */
  tlsPolicyMismatch: (exchange: string, domain: string) =>
    reply(451, "4.7.5", `MX host ${exchange} does not match the MTA-STS policy of ${domain}; not delivering`),
  /** DANE: the TLSA records could not be looked up (or are not usable) and the zone is signed */
  daneLookupFailed: (exchange: string, detail: string) =>
    reply(451, "4.7.5", `DANE TLSA lookup for ${exchange} failed: ${detail}`),
  smtputf8Unsupported: (exchange: string) =>
    reply(553, "5.6.7", `${exchange} does not support SMTPUTF8, which this message requires`),
  blockedAddress: (exchange: string, address: string) =>
    reply(550, "5.4.4", `Not connecting to ${exchange} [${address}]: loopback, private or reserved address`),
  deletedByOperator: () => reply(550, "5.0.0", "Removed from the queue by the mail administrator"),
} as const;
