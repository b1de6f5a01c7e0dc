import { isIPv6, type Socket } from "node:net";
import { replies } from "@mailpipe/contracts";
import mxConnect, { type MxConnectError } from "mx-connect";
import { ConnectionPool, type PoolOptions } from "./connection-pool.ts";
import { type SessionTimeouts, SmtpFailure, SmtpSession, type TlsMode } from "./smtp-session.ts";
import { checkTls, OPPORTUNISTIC, type TlsDecision, type TlsResult } from "./tls-check.ts";

export interface ConnectorOptions {
  /** SMTP_REMOTE_PORT */
  port: number;
  /** EHLO name (MAIL_HOSTNAME) */
  heloName: string;
  connectTimeoutMs: number;
  blockLocalAddresses: boolean;
  /** retry in plaintext when the handshake fails, under an opportunistic policy only */
  tlsFallbackPlain: boolean;
  /** the CAs a certificate may chain to: Node's roots plus OUTBOUND_TLS_CA_FILE's; default Node's */
  ca?: string[] | undefined;
  timeouts: SessionTimeouts;
  pool: PoolOptions;
}

/** One address of one MX host of a destination. */
export interface Target {
  domain: string;
  exchange: string;
  priority: number;
  address: string;
}

export interface Acquired {
  session: SmtpSession;
  key: string;
  reused: boolean;
  /**
   * a pooled session taken without a RSET (its last transaction ended moments ago): if it turns
   * out closed at MAIL, the transaction is tried once more on a new connection
   */
  unchecked?: boolean;
  /** set when STARTTLS failed and the session is the plaintext retry */
  tlsFailure?: SmtpFailure;
  /** the session's TLS under the policy it was acquired for */
  tls: TlsResult;
}

const NO_DNS = () => {
  // the router resolved every address; a lookup here would be a bug, not a fallback
  throw Object.assign(new Error("delivery does not resolve names"), { code: "ENOTFOUND" });
};

const CONNECT_ERRORS: Record<string, string> = {
  ECONNREFUSED: "connection refused",
  ECONNRESET: "connection reset",
  EHOSTUNREACH: "host unreachable",
  ENETUNREACH: "network unreachable",
  ETIMEDOUT: "connection timed out",
  EADDRNOTAVAIL: "local address not available",
};

function connectFailure(target: Target, err: MxConnectError): SmtpFailure {
  if (err.code === "InvalidIpAddress") {
    return new SmtpFailure("blocked", "connect", replies.blockedAddress(target.exchange, target.address), {
      cause: err,
    });
  }
  const detail =
    (err.code && CONNECT_ERRORS[err.code]) ??
    (/timed out/i.test(err.message) ? "connection timed out" : (err.code ?? "connection failed"));
  return new SmtpFailure("connect", "connect", replies.connectionFailed(detail), { cause: err });
}

/**
 * A pooled session whose last transaction ended within this time is used without a RSET first:
 * a transaction that ended with 250 leaves the session clean (RFC 5321 4.1.1.4), and servers do
 * not close a session within a second of its last reply. RSET cost a round trip per message.
 */
export const FRESH_SESSION_MS = 1000;

/**
 * Sessions to remote addresses: a pooled one when there is one (checked with RSET unless it was
 * used within FRESH_SESSION_MS), else a new TCP connection through mx-connect (address policy,
 * connect timeout) and an SMTP session over it, whose TLS is then checked against the host's
 * policy (tls-check.ts); retried in plaintext when STARTTLS fails and the policy is opportunistic.
 */
export class Connector {
  readonly pool: ConnectionPool;
  readonly #o: ConnectorOptions;

  constructor(o: ConnectorOptions) {
    this.#o = o;
    this.pool = new ConnectionPool(o.pool);
  }

  /**
   * Pool key: the address and port, the name the certificate is checked against, and the TLS
   * policy the session was made under (a plaintext fallback session stays under the policy that
   * produced it, so the failed handshake is not repeated for every message; a session checked
   * under one policy is never taken for a stricter one).
   */
  keyOf(target: Target, tls: TlsDecision = OPPORTUNISTIC): string {
    const tlsa = tls.tlsa?.map((r) => `${r.usage}${r.selector}${r.matchingType}${r.data.toString("hex")}`);
    const policy = `${tls.level}${tls.reportOnly ? "+report" : ""}${tlsa ? `:${tlsa.join(",")}` : ""}`;
    return `${target.address}|${this.#o.port}|${target.exchange.toLowerCase()}|${policy}`;
  }

  /** Rejects with SmtpFailure. `fresh`: a new connection, not a pooled one. */
  async acquire(target: Target, opts: { fresh?: boolean; tls?: TlsDecision } = {}): Promise<Acquired> {
    const decision = opts.tls ?? OPPORTUNISTIC;
    const key = this.keyOf(target, decision);
    for (let s = opts.fresh ? undefined : this.pool.take(key); s; s = this.pool.take(key)) {
      // a pooled session passed this policy's check when it was opened
      const tls = checkTls(s, decision).result;
      if (performance.now() - s.lastUsedAt < FRESH_SESSION_MS) {
        return { session: s, key, reused: true, unchecked: true, tls };
      }
      try {
        await s.reset();
        return { session: s, key, reused: true, tls };
      } catch {
        s.destroy(); // closed by the server while idle: open a fresh one
      }
    }
    let session: SmtpSession;
    let tlsFailure: SmtpFailure | undefined;
    try {
      session = await this.#open(target, "starttls");
    } catch (err) {
      const failure = err as SmtpFailure;
      // under any stricter policy a plaintext retry would be weaker than what the policy refuses
      if (failure.kind !== "tls" || decision.level !== "opportunistic" || !this.#o.tlsFallbackPlain) {
        if (failure.kind === "tls") {
          failure.tls = { policy: decision.level, source: decision.source, failure: "validation-failure" };
          failure.tls.detail = failure.reply.text;
        }
        throw err;
      }
      session = await this.#open(target, "none");
      tlsFailure = failure;
    }
    const checked = checkTls(session, decision);
    if (checked.failure) {
      void session.quit();
      checked.failure.tls = checked.result;
      throw checked.failure;
    }
    const tls =
      tlsFailure && decision.reportOnly
        ? { ...checked.result, failure: "validation-failure" as const, detail: tlsFailure.message }
        : checked.result;
    return { session, key, reused: false, tls, ...(tlsFailure ? { tlsFailure } : {}) };
  }

  /** After a successful transaction: back to the pool (or closed, if it should not be kept). */
  release(acquired: Acquired): void {
    this.pool.put(acquired.key, acquired.session);
  }

  /** After any error: the session's state is unknown, never reuse it. */
  discard(acquired: Acquired): void {
    acquired.session.destroy();
  }

  close(): Promise<void> {
    return this.pool.close();
  }

  async #open(target: Target, tls: TlsMode): Promise<SmtpSession> {
    const o = this.#o;
    let socket: Socket;
    try {
      const connection = await mxConnect({
        target: target.domain,
        mx: [
          {
            exchange: target.exchange,
            priority: target.priority,
            ...(isIPv6(target.address) ? { AAAA: [target.address] } : { A: [target.address] }),
          },
        ],
        port: o.port,
        maxConnectTime: o.connectTimeoutMs,
        localHostname: o.heloName,
        dnsOptions: { blockLocalAddresses: o.blockLocalAddresses, resolveRecords: NO_DNS },
      });
      socket = connection.socket;
    } catch (err) {
      throw connectFailure(target, err as MxConnectError);
    }
    return SmtpSession.open({
      socket,
      address: target.address,
      port: o.port,
      exchange: target.exchange,
      heloName: o.heloName,
      tls,
      ca: o.ca,
      timeouts: o.timeouts,
    });
  }
}
