import type { Readable } from "node:stream";
import type { BodyRef, MxHost, Outcome, RemoteDeliveryRequest, Reply } from "@mailpipe/contracts";
import { replies, reply } from "@mailpipe/contracts";
import {
  attr,
  type Counter,
  inSpan,
  type Logger,
  type Span,
  SpanKind,
  SpanStatusCode,
  type Tracer,
} from "@mailpipe/telemetry";
import { lazyBody } from "./body-stream.ts";
import type { Acquired, Connector, Target } from "./connector.ts";
import { type DestinationTls, OPPORTUNISTIC_ONLY, type OutboundTls } from "./outbound-tls.ts";
import { ASCII, type RecipientDsn, type SessionEnvelope, SmtpFailure } from "./smtp-session.ts";
import type { TlsResult } from "./tls-check.ts";

export interface RecipientResult {
  address: string;
  outcome: Outcome;
  reply: Reply;
  /** `exchange [address]` of the host the reply came from */
  remoteMta: string | undefined;
  /** the TLS policy and session of the host that gave the reply */
  tls?: TlsResult;
  /**
   * delivered with NOTIFY=SUCCESS to a next hop that took the sender's DSN parameters: the success
   * notice is its to send
   */
  dsnRelayed?: true;
}

export interface TransactionDeps {
  connector: Connector;
  openBody: (ref: BodyRef) => Promise<Readable>;
  tracer: Tracer;
  log: Logger;
  connections: Counter<"reused">;
  /** TLS policy per destination and MX host (TLS_POLICY, MTA-STS, DANE); default opportunistic */
  tls?: OutboundTls;
}

/** What one address attempt came to: final results, or a failure that sends us to the next address. */
type AttemptResult =
  | { kind: "done"; results: RecipientResult[] }
  | { kind: "failed"; failure: SmtpFailure; permanent: boolean };

export const outcomeOf = (r: Reply): Outcome =>
  r.code < 300 ? "delivered" : r.code < 500 ? "deferred" : "bounced";

export const smtputf8Unsupported = (exchange: string): Reply => replies.smtputf8Unsupported(exchange);

/**
 * One SMTP transaction for one destination: MX hosts in order, each address in order, until one
 * gives an answer for the recipients. A host that fails before the envelope is answered (no
 * connection, greeting/EHLO/MAIL refused, timeout, TLS failure without fallback) sends us to the
 * next; when all fail, every recipient is deferred with the last reply, or bounced when every
 * host refused permanently (5xx to MAIL FROM, SIZE, SMTPUTF8, blocked address).
 */
export async function runTransaction(
  request: RemoteDeliveryRequest,
  deps: TransactionDeps,
): Promise<RecipientResult[]> {
  const addresses = request.recipients.map((r) => r.address);
  const needsSmtpUtf8 =
    request.smtputf8 || !ASCII.test(request.mailFrom) || addresses.some((a) => !ASCII.test(a));
  let last: { reply: Reply; remoteMta: string; tls?: TlsResult } | undefined;
  let allPermanent = true;
  const tried = new Set<string>();
  const policy = deps.tls ? await deps.tls.forDestination(request.destination.domain) : OPPORTUNISTIC_ONLY;

  for (const host of request.destination.hosts) {
    const chosen = await policy.forHost(host.exchange);
    if ("failure" in chosen) {
      // the policy refuses this host before any connection (MTA-STS mx mismatch, DANE lookup)
      const remoteMta = `${host.exchange} [${host.addresses[0] ?? ""}]`;
      last = {
        reply: chosen.failure.reply,
        remoteMta,
        ...(chosen.failure.tls ? { tls: chosen.failure.tls } : {}),
      };
      allPermanent = false;
      deps.log.info(
        { relay: host.exchange, policy: "refused", reply: formatFailure(chosen.failure) },
        "TLS policy refuses this MX host",
      );
      continue;
    }
    for (const address of host.addresses) {
      if (tried.has(address)) continue; // one address under two MX names
      tried.add(address);
      const remoteMta = `${host.exchange} [${address}]`;
      const target: Target = {
        domain: request.destination.domain,
        exchange: host.exchange,
        priority: host.priority,
        address,
      };
      const result = await inSpan(
        deps.tracer,
        "smtp.connect",
        {
          kind: SpanKind.CLIENT,
          attributes: {
            [attr.serverAddress]: host.exchange,
            [attr.peerAddress]: address,
            [attr.mx]: host.exchange,
            "mail.mx.priority": host.priority,
          },
        },
        (span) => attempt(request, host, target, remoteMta, needsSmtpUtf8, { ...deps, policy, chosen }, span),
      );
      if (result.kind === "done") return result.results;
      last = {
        reply: result.failure.reply,
        remoteMta,
        ...(result.failure.tls ? { tls: result.failure.tls } : {}),
      };
      if (!result.permanent) allPermanent = false;
      deps.log.info(
        {
          relay: remoteMta,
          failure: result.failure.kind,
          stage: result.failure.stage,
          reply: formatFailure(result.failure),
        },
        "attempt on this address failed",
      );
    }
  }
  // every address failed (hosts is never empty: the contract requires one with one address)
  const final = last ?? { reply: reply(451, "4.4.0", "No address to try"), remoteMta: "" };
  const outcome: Outcome = allPermanent ? "bounced" : "deferred";
  return addresses.map((address) => ({
    address,
    outcome,
    reply: final.reply,
    remoteMta: final.remoteMta || undefined,
    ...("tls" in final && final.tls ? { tls: final.tls } : {}),
  }));
}

const formatFailure = (f: SmtpFailure) => `${f.reply.code} ${f.reply.enhanced} ${f.reply.text}`;

type AttemptDeps = TransactionDeps & {
  policy: DestinationTls;
  chosen: { decision: import("./tls-check.ts").TlsDecision };
};

async function attempt(
  request: RemoteDeliveryRequest,
  host: MxHost,
  target: Target,
  remoteMta: string,
  needsSmtpUtf8: boolean,
  deps: AttemptDeps,
  span: Span,
): Promise<AttemptResult> {
  const first = await attemptOnce(request, host, target, remoteMta, needsSmtpUtf8, deps, span, false);
  if (first.kind === "failed" && first.uncheckedSessionGone) {
    // a pooled session taken without RSET had been closed: nothing was sent, try a new connection
    span.addEvent("smtp.session.closed_while_pooled");
    return attemptOnce(request, host, target, remoteMta, needsSmtpUtf8, deps, span, true);
  }
  return first;
}

async function attemptOnce(
  request: RemoteDeliveryRequest,
  host: MxHost,
  target: Target,
  remoteMta: string,
  needsSmtpUtf8: boolean,
  deps: AttemptDeps,
  span: Span,
  fresh: boolean,
): Promise<AttemptResult & { uncheckedSessionGone?: boolean }> {
  let acquired: Acquired;
  const decision = deps.chosen.decision;
  span.setAttribute("smtp.tls.policy", decision.level);
  span.setAttribute("smtp.tls.policy_source", decision.source);
  try {
    acquired = await deps.connector.acquire(target, { fresh, tls: decision });
  } catch (err) {
    const failure = asFailure(err);
    if (failure.tls) deps.policy.report(host.exchange, target.address, failure.tls);
    markFailed(span, failure);
    return { kind: "failed", failure, permanent: failure.kind === "blocked" };
  }
  if (!acquired.reused) deps.policy.report(host.exchange, target.address, acquired.tls);
  if (acquired.tls.failure) {
    // MTA-STS testing: delivered anyway, the failure goes to the TLS report
    span.addEvent("tls.policy.failed", { "smtp.tls.failure": acquired.tls.failure });
  }
  const { session } = acquired;
  deps.connections.inc({ reused: String(acquired.reused) });
  span.setAttribute(attr.serverPort, session.port);
  span.setAttribute("smtp.connection.reused", acquired.reused);
  if (acquired.tlsFailure) {
    span.addEvent("starttls.failed", { "smtp.tls.fallback": "plaintext" });
  }
  if (session.secure) {
    // semantic conventions: tls.protocol.version is "1.3", not "TLSv1.3"
    const version = session.tlsVersion?.replace(/^TLSv/, "") ?? "unknown";
    span.setAttribute(attr.tlsProtocol, version);
    if (!acquired.reused) span.addEvent("starttls", { [attr.tlsProtocol]: version });
  }

  if (needsSmtpUtf8 && !session.supports("SMTPUTF8")) {
    deps.connector.release(acquired); // no transaction was started: the session is still clean
    const failure = new SmtpFailure("reply", "MAIL", smtputf8Unsupported(host.exchange));
    markFailed(span, failure);
    return { kind: "failed", failure, permanent: true };
  }

  const addresses = request.recipients.map((r) => r.address);
  const body = lazyBody(() => deps.openBody(request.body));
  try {
    const sent = await session.send(
      {
        from: request.mailFrom,
        to: addresses,
        size: request.body.size,
        eightBitMime: request.bodyType === "8BITMIME",
        smtputf8: needsSmtpUtf8,
        dsn: dsnParameters(request),
      },
      body,
    );
    deps.connector.release(acquired);
    setReply(span, sent.reply);
    const refused = new Map(sent.rejected.map((r) => [r.address, r.reply]));
    // the router needs to know only for recipients that asked for a success notice
    const asksSuccess = new Set(
      request.recipients.filter((r) => r.notify?.includes("SUCCESS")).map((r) => r.address),
    );
    return {
      kind: "done",
      results: addresses.map((address) => {
        const r = refused.get(address) ?? sent.reply;
        const outcome = outcomeOf(r);
        return {
          address,
          outcome,
          reply: r,
          remoteMta,
          tls: acquired.tls,
          ...(sent.dsnRelayed && outcome === "delivered" && asksSuccess.has(address)
            ? { dsnRelayed: true as const }
            : {}),
        };
      }),
    };
  } catch (err) {
    deps.connector.discard(acquired);
    body.destroy();
    const failure = asFailure(err);
    const results = finalResults(failure, addresses, remoteMta)?.map((r) => ({ ...r, tls: acquired.tls }));
    if (results) {
      setReply(span, failure.reply);
      return { kind: "done", results };
    }
    // the session closed under us before MAIL was answered (a lost connection, or the 421 a
    // server sends as it closes an idle session): no recipient can have been accepted
    const gone =
      acquired.unchecked === true &&
      failure.stage === "MAIL" &&
      failure.accepted.length === 0 &&
      (failure.kind === "lost" || (failure.kind === "reply" && failure.reply.code === 421));
    if (gone) return { kind: "failed", failure, permanent: false, uncheckedSessionGone: true };
    markFailed(span, failure);
    return {
      kind: "failed",
      failure,
      permanent: failure.kind === "size" || (failure.stage === "MAIL" && failure.reply.code >= 500),
    };
  }
}

/** The sender's RFC 3461 parameters for the session to pass on (it does when the server has DSN). */
function dsnParameters(request: RemoteDeliveryRequest): SessionEnvelope["dsn"] {
  const recipients = new Map<string, RecipientDsn>();
  for (const r of request.recipients) {
    if (r.notify || r.original) recipients.set(r.address, { notify: r.notify, original: r.original });
  }
  return { envelope: request.dsn, recipients };
}

/**
 * Results a failed send() still settles: refusals at RCPT or DATA, and a body we could not read.
 * Undefined when the failure is the host's (MAIL refused, 421, timeout, lost connection): the
 * next address gets every recipient.
 */
function finalResults(
  failure: SmtpFailure,
  addresses: string[],
  remoteMta: string,
): RecipientResult[] | undefined {
  const refused = new Map(failure.rejected.map((r) => [r.address, r.reply]));
  const settle = (fallback: Reply) =>
    addresses.map((address) => {
      const r = refused.get(address) ?? fallback;
      return { address, outcome: outcomeOf(r), reply: r, remoteMta };
    });
  if (failure.kind === "body") {
    // our side failed mid-transaction; nothing was delivered, the router retries later
    return addresses.map((address) => ({
      address,
      outcome: "deferred" as const,
      reply: failure.reply,
      remoteMta,
    }));
  }
  if (failure.kind !== "reply" || failure.reply.code === 421) return undefined;
  switch (failure.stage) {
    case "RCPT":
    case "DATA":
    case "message":
    case "end of data":
      return settle(failure.reply);
    default:
      return undefined;
  }
}

function asFailure(err: unknown): SmtpFailure {
  if (err instanceof SmtpFailure) return err;
  return new SmtpFailure(
    "lost",
    "connect",
    reply(451, "4.4.0", `Delivery attempt failed: ${(err as Error)?.message ?? String(err)}`),
    { cause: err },
  );
}

function setReply(span: Span, r: Reply): void {
  span.setAttribute(attr.replyCode, r.code);
  span.setAttribute(attr.replyEnhanced, r.enhanced);
}

/** Reply texts often quote addresses: spans get the codes and where it failed, never the text. */
function markFailed(span: Span, failure: SmtpFailure): void {
  setReply(span, failure.reply);
  span.setAttribute("smtp.failure", failure.kind);
  span.setAttribute(attr.smtpCommand, failure.stage);
  span.setStatus({ code: SpanStatusCode.ERROR, message: `${failure.kind} at ${failure.stage}` });
}
