// One SMTP client session to one remote address, on nodemailer's SMTPConnection. Every use of
// nodemailer internals (the names starting with `_`) is in this file, so a nodemailer upgrade that
// moves them breaks here and in smtp-session.test.ts, nowhere else.

import type { X509Certificate } from "node:crypto";
import type net from "node:net";
import type { Readable } from "node:stream";
import type { TLSSocket } from "node:tls";
import { type DsnNotify, type EnvelopeDsn, parseRemoteReply, type Reply, replies } from "@mailpipe/contracts";
import SMTPConnection from "nodemailer/lib/smtp-connection";
import type { TlsResult } from "./tls-check.ts";

/** RFC 5321 4.5.3.2 timers, in ms. */
export interface SessionTimeouts {
  greetingMs: number;
  commandMs: number;
  dataInitMs: number;
  dataBlockMs: number;
  dataDoneMs: number;
}

/**
 * starttls: STARTTLS when offered, with any certificate (whether it verified is read afterwards,
 * `tls`, and the connector's policy decides); none: no STARTTLS.
 */
export type TlsMode = "starttls" | "none";

/** What the TLS handshake came to, as a policy check and the delivery event need it. */
export interface TlsInfo {
  /** e.g. "TLSv1.3" */
  version: string | undefined;
  /** OpenSSL's name, e.g. "TLS_AES_256_GCM_SHA384" */
  cipher: string | undefined;
  /** the certificate chains to a trusted CA and is valid for the MX name */
  authorized: boolean;
  /** why not, as Node's TLS layer says it (e.g. "CERT_HAS_EXPIRED", "ERR_TLS_CERT_ALTNAME_INVALID") */
  authorizationError: string | undefined;
  /** the server's certificate, and the issuers it sent or that were found (for DANE) */
  certificate: X509Certificate | undefined;
  chain: X509Certificate[];
}

/** The step of the dialogue a session is at; a failure or a timeout is reported against it. */
export type Stage =
  | "connect"
  | "greeting"
  | "EHLO"
  | "STARTTLS"
  | "idle"
  | "RSET"
  | "MAIL"
  | "RCPT"
  | "DATA"
  | "message"
  | "end of data"
  | "QUIT";

export type FailureKind =
  /** a TLS policy refused the MX host before connecting (MTA-STS mx mismatch, DANE lookup failure) */
  | "policy"
  /** TCP connect failed (refused, unreachable, timed out) */
  | "connect"
  /** the address is loopback/private and SMTP_BLOCK_LOCAL_ADDRESSES is on */
  | "blocked"
  /** a reply timer ran out */
  | "timeout"
  /** the connection broke without a reply */
  | "lost"
  /** the STARTTLS handshake failed */
  | "tls"
  /** the server answered with a 4xx/5xx reply */
  | "reply"
  /** the message is larger than the server's SIZE */
  | "size"
  /** the body could not be read from the body store (our side) */
  | "body";

export interface RecipientReply {
  address: string;
  reply: Reply;
}

/** Why an attempt on one address failed, with what the server had said per recipient by then. */
export class SmtpFailure extends Error {
  override name = "SmtpFailure";
  readonly kind: FailureKind;
  readonly stage: Stage;
  /** the reply to report: the server's, or one of ours describing the failure */
  readonly reply: Reply;
  /** recipients the server had accepted (RCPT 2xx) when the failure happened */
  accepted: string[] = [];
  /** recipients the server had refused at RCPT */
  rejected: RecipientReply[] = [];
  /** a TLS policy refused the session (or its handshake failed under one): what it came to */
  tls?: TlsResult;

  constructor(kind: FailureKind, stage: Stage, reply: Reply, options?: { cause?: unknown }) {
    super(`${kind} at ${stage}: ${reply.code} ${reply.enhanced} ${reply.text}`, options);
    this.kind = kind;
    this.stage = stage;
    this.reply = reply;
  }
}

export interface OpenOptions {
  /** a connected socket (mx-connect made it) */
  socket: net.Socket;
  address: string;
  port: number;
  /** the MX host name: SNI and certificate name */
  exchange: string;
  /** EHLO name (MAIL_HOSTNAME) */
  heloName: string;
  tls: TlsMode;
  /** CAs a certificate may chain to (the system's and any extra ones); default Node's bundled roots */
  ca?: string[] | undefined;
  timeouts: SessionTimeouts;
}

export interface SessionEnvelope {
  /** "" for the null sender */
  from: string;
  to: string[];
  /** declared as SIZE= when the server supports it */
  size: number;
  /** BODY=8BITMIME, when the server advertises 8BITMIME */
  eightBitMime: boolean;
  /** send SMTPUTF8 even when every address is ASCII (the caller checked the server supports it) */
  smtputf8: boolean;
  /**
   * The sender's RFC 3461 parameters, passed on when the server advertises DSN: RET and ENVID on
   * MAIL, and NOTIFY and ORCPT on each recipient's RCPT (keyed by the address in `to`).
   */
  dsn?: { envelope?: EnvelopeDsn | undefined; recipients: ReadonlyMap<string, RecipientDsn> };
}

/** One recipient's RFC 3461 RCPT parameters. */
export interface RecipientDsn {
  notify?: readonly DsnNotify[] | undefined;
  /** the original recipient address (ORCPT=rfc822;...) */
  original?: string | undefined;
}

export interface SendResult {
  accepted: string[];
  rejected: RecipientReply[];
  /** the reply to the end of data */
  reply: Reply;
  /** the server advertised DSN, so the sender's DSN parameters went with the transaction */
  dsnRelayed: boolean;
}

export type Extension = "8BITMIME" | "SMTPUTF8" | "PIPELINING" | "SIZE" | "DSN";

/** nodemailer's errors are plain Errors with these fields. */
interface ClientError extends Error {
  code?: string;
  command?: string;
  response?: string;
  responseCode?: number;
  recipient?: string;
}

/** What SMTPConnection keeps without a public accessor. */
interface Internals {
  _sendCommand(str: string, logStr?: string): void;
  _supportedExtensions: string[];
  _maxAllowedSize: number;
  _socket: net.Socket | TLSSocket | false | null;
  _envelope: false | { accepted?: string[]; rejectedErrors?: ClientError[]; pipelined?: boolean };
  _destroyed: boolean;
  _closing: boolean;
  upgrading?: boolean;
}

const ENHANCED = /^[245]\.\d{1,3}\.\d{1,3}\s+/;

/**
 * A reply as nodemailer hands it over ("550-5.1.1 first line\n550 5.1.1 last line") as a Reply;
 * continuation lines lose their code and repeated enhanced code.
 */
export function replyFromResponse(response: string | undefined): Reply | undefined {
  if (!response) return undefined;
  const code = Number(/^(\d{3})/.exec(response)?.[1]);
  if (!(code >= 200 && code <= 599)) return undefined;
  const lines = response.split(/\r?\n/).map((l) => l.replace(/^\d{3}[ -]?/, "").trim());
  const stripRepeats = ENHANCED.test(lines[0] ?? "");
  const text = lines
    .map((l, i) => (i > 0 && stripRepeats ? l.replace(ENHANCED, "") : l))
    .filter(Boolean)
    .join(" ");
  return parseRemoteReply(code, text);
}

function stageOfCommand(err: ClientError, current: Stage): Stage {
  switch (err.command) {
    case "MAIL FROM":
      return "MAIL";
    case "RCPT TO":
      return "RCPT";
    case "DATA":
      // EMESSAGE is the reply after the final dot; EENVELOPE the reply to the DATA command
      return err.code === "EMESSAGE" ? "end of data" : "DATA";
    case "EHLO":
    case "HELO":
      return "EHLO";
    case "STARTTLS":
      return "STARTTLS";
    case "RSET":
      return "RSET";
    default:
      return current;
  }
}

function waitingFor(stage: Stage): string {
  switch (stage) {
    case "greeting":
      return "waiting for the greeting";
    case "message":
      return "while sending the message";
    case "end of data":
      return "waiting for the reply to the end of data";
    case "idle":
      return "while idle";
    default:
      return `waiting for the reply to ${stage}`;
  }
}

export class SmtpSession {
  readonly address: string;
  readonly port: number;
  readonly exchange: string;
  /** transactions completed on this session */
  messages = 0;
  /** when the last transaction ended (ms, performance.now); 0 before the first */
  lastUsedAt = 0;
  readonly #conn: SMTPConnection;
  readonly #internals: Internals;
  readonly #timeouts: SessionTimeouts;
  #stage: Stage = "greeting";
  #forceSmtpUtf8 = false;
  /** the RCPT parameters of the transaction under way, by address */
  #rcptDsn: ReadonlyMap<string, RecipientDsn> | undefined;
  #lastError: ClientError | undefined;

  private constructor(conn: SMTPConnection, o: OpenOptions) {
    this.#conn = conn;
    this.#internals = conn as unknown as Internals;
    this.#timeouts = o.timeouts;
    this.address = o.address;
    this.port = o.port;
    this.exchange = o.exchange;
    // Errors also reach the callbacks; without a listener an 'error' event would crash the process.
    conn.on("error", (err: ClientError) => {
      this.#lastError = err;
    });
    this.#hookCommands();
  }

  /** Greeting, EHLO and (unless tls is "none") STARTTLS + EHLO again. Rejects with SmtpFailure. */
  static open(o: OpenOptions): Promise<SmtpSession> {
    const t = o.timeouts;
    const servername = o.exchange.replace(/\.$/, "");
    const conn = new SMTPConnection({
      connection: o.socket,
      host: o.address,
      port: o.port,
      name: o.heloName,
      servername,
      ignoreTLS: o.tls === "none",
      // a 4xx/5xx reply to STARTTLS continues in plaintext, as if STARTTLS had not been offered
      opportunisticTLS: true,
      // the handshake takes any certificate: the policy reads `tls` afterwards and refuses a
      // session it does not accept before MAIL, so no policy needs a second handshake
      tls: { rejectUnauthorized: false, servername, ...(o.ca ? { ca: o.ca } : {}) },
      greetingTimeout: t.greetingMs,
      // nodemailer bounds greeting + EHLO + TLS handshake by this; each step also has its own timer
      connectionTimeout: t.greetingMs + 2 * t.commandMs,
      // the inactivity timer; #enter() sets it per stage from here on
      socketTimeout: t.greetingMs,
      socketCloseTimeout: 2000,
      logger: false,
    });
    const session = new SmtpSession(conn, o);
    return session.#settle<SmtpSession>((resolve, reject) => {
      conn.connect((err) => {
        if (err) reject(err);
        else {
          session.#stage = "idle";
          resolve(session);
        }
      });
    });
  }

  get secure(): boolean {
    return this.#conn.secure;
  }

  /** e.g. "TLSv1.3", when the session runs over TLS */
  get tlsVersion(): string | undefined {
    const socket = this.#internals._socket;
    if (!this.#conn.secure || !socket || !("getProtocol" in socket)) return undefined;
    return socket.getProtocol() ?? undefined;
  }

  /** The TLS session, when the connection runs over TLS. */
  get tls(): TlsInfo | undefined {
    const socket = this.#internals._socket;
    if (!this.#conn.secure || !socket || !("getPeerX509Certificate" in socket)) return undefined;
    const certificate = socket.getPeerX509Certificate();
    const chain: X509Certificate[] = [];
    for (let c = certificate?.issuerCertificate; c && chain.length < 10; c = c.issuerCertificate) {
      // a self-signed root is its own issuer: stop there
      if (chain.some((x) => x.fingerprint256 === c!.fingerprint256)) break;
      chain.push(c);
    }
    const error = socket.authorizationError as unknown;
    return {
      version: socket.getProtocol() ?? undefined,
      cipher: socket.getCipher()?.name,
      authorized: socket.authorized,
      authorizationError: error instanceof Error ? error.message : error ? String(error) : undefined,
      certificate,
      chain,
    };
  }

  /** connected and between transactions: can take a RSET and another message */
  get usable(): boolean {
    const socket = this.#internals._socket;
    return (
      !this.#internals._destroyed &&
      !this.#internals._closing &&
      !!socket &&
      !socket.destroyed &&
      socket.writable
    );
  }

  supports(extension: Extension): boolean {
    return this.#internals._supportedExtensions.includes(extension);
  }

  /** RSET: checks a pooled session is still alive and clean before it carries another message. */
  reset(): Promise<void> {
    return this.#settle<void>((resolve, reject) => {
      this.#conn.reset((err) => {
        if (err) reject(err);
        else {
          this.#stage = "idle";
          resolve();
        }
      });
    });
  }

  /** One transaction: MAIL, RCPT per recipient, DATA with `body`. Rejects with SmtpFailure. */
  send(envelope: SessionEnvelope, body: Readable): Promise<SendResult> {
    this.#forceSmtpUtf8 = envelope.smtputf8;
    const dsn = envelope.dsn && this.supports("DSN") ? envelope.dsn : undefined;
    this.#rcptDsn = dsn?.recipients;
    const mailDsn = dsn?.envelope && (dsn.envelope.ret || dsn.envelope.envid) ? dsn.envelope : undefined;
    // nodemailer pipes the body once the server said 354: from then on the data timers apply
    body.once("resume", () => this.#enter("message", this.#timeouts.dataBlockMs));
    body.once("end", () => this.#enter("end of data", this.#timeouts.dataDoneMs));
    return this.#settle<SendResult>((resolve, reject) => {
      this.#conn.send(
        {
          from: envelope.from,
          to: envelope.to,
          size: envelope.size,
          use8BitMime: envelope.eightBitMime,
          // RET and ENVID (nodemailer writes them on MAIL when the server has DSN); NOTIFY and
          // ORCPT differ per recipient, so #hookCommands writes them on each RCPT
          ...(mailDsn ? { dsn: { ...mailDsn } } : {}),
        },
        body,
        (err, info) => {
          this.#forceSmtpUtf8 = false;
          this.#rcptDsn = undefined;
          if (err || !info) {
            reject(err ?? new Error("send finished without a result"));
            return;
          }
          this.messages++;
          this.lastUsedAt = performance.now();
          this.#enter("idle", this.#timeouts.commandMs);
          resolve({
            accepted: info.accepted,
            rejected: this.#recipientReplies(info.rejectedErrors ?? []),
            reply: replyFromResponse(info.response) ?? replies.delivered(),
            dsnRelayed: dsn !== undefined,
          });
        },
      );
    });
  }

  /** QUIT, then close; resolves once closed. A server that does not answer is cut off after 2 s. */
  quit(): Promise<void> {
    if (!this.usable) {
      this.destroy();
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.#conn.close();
        resolve();
      }, 2000);
      timer.unref();
      this.#conn.once("end", () => {
        clearTimeout(timer);
        resolve();
      });
      this.#conn.quit();
    });
  }

  destroy(): void {
    this.#conn.close();
  }

  /** Runs one operation; its errors, and the connection ending without one, become SmtpFailure. */
  #settle<T>(run: (resolve: (v: T) => void, reject: (err: unknown) => void) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let done = false;
      const onEnd = () =>
        // nodemailer ends the connection before it calls back with the error: let that error win
        setImmediate(() => finish(() => reject(this.#failure(this.#lastError))));
      const finish = (f: () => void) => {
        if (done) return;
        done = true;
        this.#conn.off("end", onEnd);
        f();
      };
      this.#conn.once("end", onEnd);
      try {
        run(
          (v) => finish(() => resolve(v)),
          (err) => finish(() => reject(this.#failure(err))),
        );
      } catch (err) {
        finish(() => reject(this.#failure(err)));
      }
    });
  }

  /** Sets the inactivity timer for the reply (or progress) expected next. */
  #enter(stage: Stage, timeoutMs: number): void {
    this.#stage = stage;
    const socket = this.#internals._socket;
    if (socket && !socket.destroyed) socket.setTimeout(timeoutMs);
  }

  /**
   * Wraps nodemailer's command writer: it is where a stage starts (and so its timer), and where
   * SMTPUTF8 is added when the message needs it although every address is ASCII, which
   * nodemailer only does for non-ASCII addresses.
   */
  #hookCommands(): void {
    const original = this.#internals._sendCommand.bind(this.#conn);
    const t = this.#timeouts;
    this.#internals._sendCommand = (str: string, logStr?: string) => {
      let line = str;
      const verb = line.slice(0, 4).toUpperCase();
      switch (verb) {
        case "MAIL":
          if (this.#forceSmtpUtf8 && !/\sSMTPUTF8(\s|$)/i.test(line)) line += " SMTPUTF8";
          this.#enter("MAIL", t.commandMs);
          break;
        case "RCPT":
          line += rcptDsnArgs(line, this.#rcptDsn);
          this.#enter("RCPT", t.commandMs);
          break;
        case "DATA": {
          // pipelined, DATA leaves with MAIL and RCPT: the envelope replies keep their own timer
          const envelope = this.#internals._envelope;
          const pipelined = envelope !== false && envelope.pipelined === true;
          this.#enter("DATA", pipelined ? Math.max(t.dataInitMs, t.commandMs) : t.dataInitMs);
          break;
        }
        case "EHLO":
        case "HELO":
          this.#enter("EHLO", t.commandMs);
          break;
        case "STAR":
          this.#enter("STARTTLS", t.commandMs);
          break;
        case "RSET":
          this.#enter("RSET", t.commandMs);
          break;
        case "QUIT":
          this.#enter("QUIT", t.commandMs);
          break;
      }
      original(line, logStr === str ? line : logStr);
    };
  }

  #recipientReplies(errors: ClientError[]): RecipientReply[] {
    const out: RecipientReply[] = [];
    for (const e of errors) {
      const reply = replyFromResponse(e.response);
      if (e.recipient && reply) out.push({ address: e.recipient, reply });
    }
    return out;
  }

  #failure(raw: unknown): SmtpFailure {
    if (raw instanceof SmtpFailure) return raw;
    const err = (raw ?? new Error("connection closed")) as ClientError;
    const stage = stageOfCommand(err, this.#stage);
    const failure = this.#classify(err, stage);
    const envelope = this.#internals._envelope;
    if (envelope) {
      failure.accepted = [...(envelope.accepted ?? [])];
      failure.rejected = this.#recipientReplies(envelope.rejectedErrors ?? []);
    }
    return failure;
  }

  #classify(err: ClientError, stage: Stage): SmtpFailure {
    const opts = { cause: err };
    if (err.code === "ESTREAM") return new SmtpFailure("body", stage, replies.localError(), opts);
    const remote = typeof err.responseCode === "number" ? replyFromResponse(err.response) : undefined;
    if (remote && remote.code >= 400) return new SmtpFailure("reply", stage, remote, opts);
    // a handshake that stalls is as much a TLS failure as one that errors: both may fall back
    if (stage === "STARTTLS" || this.#conn.upgrading || err.code === "ETLS") {
      const detail = err.code === "ETIMEDOUT" ? "timed out" : tlsDetail(err);
      return new SmtpFailure("tls", "STARTTLS", replies.tlsFailed(detail), opts);
    }
    if (err.code === "ETIMEDOUT") {
      const seconds = Math.round(this.#timeoutOf(stage) / 1000);
      return new SmtpFailure(
        "timeout",
        stage,
        replies.connectionLost(`timed out after ${seconds} s ${waitingFor(stage)}`),
        opts,
      );
    }
    if (err.code === "EMESSAGE" && stage === "MAIL") {
      return new SmtpFailure("size", stage, replies.messageTooBig(this.#internals._maxAllowedSize), opts);
    }
    return new SmtpFailure(
      "lost",
      stage,
      replies.connectionLost(`connection closed ${waitingFor(stage)}`),
      opts,
    );
  }

  #timeoutOf(stage: Stage): number {
    const t = this.#timeouts;
    switch (stage) {
      case "greeting":
        return t.greetingMs;
      case "DATA":
        return t.dataInitMs;
      case "message":
        return t.dataBlockMs;
      case "end of data":
        return t.dataDoneMs;
      default:
        return t.commandMs;
    }
  }
}

/** RFC 3461 4: xtext, every octet outside "!".."~", and "+" and "=", as +HH. */
export function xtext(value: string): string {
  let out = "";
  for (const byte of Buffer.from(value, "utf8")) {
    out +=
      byte < 0x21 || byte > 0x7e || byte === 0x2b || byte === 0x3d
        ? `+${byte.toString(16).toUpperCase().padStart(2, "0")}`
        : String.fromCharCode(byte);
  }
  return out;
}

/** Only US-ASCII characters (an address that needs no SMTPUTF8). */
// biome-ignore lint/suspicious/noControlCharactersInRegex: the ASCII range is the point
export const ASCII = /^[\x00-\x7f]*$/;

/**
 * " NOTIFY=... ORCPT=rfc822;..." for the recipient a RCPT line names, or "". A non-ASCII original
 * address gets no ORCPT: rfc822 addresses are ASCII, and RFC 6533's utf-8 type is not written.
 */
export function rcptDsnArgs(line: string, params: ReadonlyMap<string, RecipientDsn> | undefined): string {
  if (!params) return "";
  const address = /^RCPT TO:<([^>]*)>/i.exec(line)?.[1];
  if (address === undefined) return "";
  const p = params.get(address) ?? params.get(address.toLowerCase());
  if (!p) return "";
  let args = "";
  if (p.notify) args += ` NOTIFY=${p.notify.join(",")}`;
  if (p.original && ASCII.test(p.original)) args += ` ORCPT=rfc822;${xtext(p.original)}`;
  return args;
}

/** The TLS library's reason without nodemailer's prefixes ("Error initiating TLS - ..."). */
function tlsDetail(err: ClientError): string {
  const reason = (err.message ?? "handshake failed").replace(/^.*? - /, "").split("\n")[0] ?? "";
  return reason.slice(0, 200) || "handshake failed";
}
