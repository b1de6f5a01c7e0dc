import type { AddressInfo } from "node:net";
import type { Bus } from "@mailpipe/bus";
import { newQueueId, parseAddress, type Reply, replies, SmtpError } from "@mailpipe/contracts";
import {
  attr,
  contextWithQueueId,
  type Span,
  SpanKind,
  SpanStatusCode,
  type Telemetry,
} from "@mailpipe/telemetry";
import { type Context, context, ROOT_CONTEXT, trace } from "@opentelemetry/api";
import {
  SMTPServer,
  type SMTPServerDataStream,
  type SMTPServerOptions,
  type SMTPServerSession,
} from "smtp-server";
import type { SMTPConnection } from "smtp-server/lib/smtp-connection.js";
import { acceptMessage } from "./accept.ts";
import { type ByteLease, type IncomingMessage, MAX_HEADER_BYTES, readMessage } from "./intake.ts";
import { smtpServerLogger } from "./logger-bridge.ts";
import { MemoryBudget } from "./memory-budget.ts";
import { edgeMetrics } from "./metrics.ts";
import { installSmtpServerPatches, onReplies } from "./patches.ts";
import { buildReceived } from "./received.ts";
import { loadTlsFiles, type TlsFiles, type TlsWatcher, watchTlsFiles } from "./tls-files.ts";

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

export interface SmtpEdgeOptions {
  service: "mx" | "msa";
  /** MAIL_HOSTNAME: the greeting, EHLO reply and Received header */
  hostname: string;
  telemetry: Telemetry;
  bus: Bus;
  hooks: EdgeHooks;
  host?: string;
  /** 0 = any free port (tests) */
  port: number;
  /** implicit TLS from the first byte (submissions port 465); needs `tls` */
  secure?: boolean;
  /** certificate and key files; without them STARTTLS is not offered (a warning is logged) */
  tls?: TlsFiles | undefined;
  /** how often the TLS files are checked for a renewal (default 5 s) */
  tlsPollIntervalMs?: number;
  /** expect a PROXY protocol v1 header: true from every peer, or from the listed load balancer addresses */
  useProxy?: boolean | string[];
  /** reverse DNS of the client (for the Received header); omitted = no lookup */
  reverseLookup?: ((ip: string) => Promise<string[]>) | undefined;
  /** default 1000 */
  reverseLookupTimeoutMs?: number;
  /** SIZE, advertised and enforced (552 5.3.4) */
  maxMessageSize: number;
  /** more RCPTs get 452 4.5.3 */
  maxRecipients: number;
  maxConnections: number;
  maxConnectionsPerIp: number;
  /** no byte from the client for this long: 421 4.4.2 */
  idleTimeoutMs: number;
  /** DATA (354 to the final dot) taking longer: 421 4.4.2 */
  dataTimeoutMs: number;
  /** a connection open longer: 421 4.4.2 */
  sessionTimeoutMs: number;
  /** more Received fields than this: 554 5.4.6 (a loop); default 50 */
  maxReceivedHeaders?: number;
  /** leave the client's IP and HELO out of our Received field (msa privacy) */
  hideClientInReceived?: boolean;
  /** name the authenticated user in our Received field (msa; off by default) */
  authUserInReceived?: boolean;
  /** text after "ESMTP" in the greeting */
  banner?: string;
  /**
   * storing and publishing one message may take this long before 451 (default 30 s); at shutdown,
   * up to this much of `close()`'s time is kept for messages being stored (see close)
   */
  acceptTimeoutMs?: number;
  /**
   * DATA bytes held in memory across sessions: a shared `MemoryBudget` (from `edgeLimits`, one per
   * process), or a size for this edge alone; default 512 MiB. Must not be below `maxMessageSize`.
   */
  memoryBudget?: MemoryBudget | number;
}

export interface SmtpEdge {
  readonly server: SMTPServer;
  /** the bound port, once listening */
  readonly port: number;
  readonly listening: boolean;
  /** connections open now */
  readonly connections: number;
  listen(): Promise<void>;
  /**
   * Two-phase shutdown, all within `timeoutMs`: stop listening, close idle sessions with
   * `421 4.3.2` and refuse new transactions; let transactions in progress finish until the last
   * `min(acceptTimeoutMs, timeoutMs / 2)`, then `421 4.3.2` those whose message has not been fully
   * received; messages fully received are still stored and answered until `timeoutMs`, then
   * `421 4.3.2` (and never queued). Resolves once every connection is gone.
   */
  close(opts?: { timeoutMs?: number }): Promise<void>;
}

interface TxState {
  tx: {
    queueId: string;
    client: EdgeClient;
    mailFrom: string;
    mailFromArgs: Record<string, string | true>;
    recipients: string[];
    smtputf8: boolean;
    bodyType: "7BIT" | "8BITMIME";
    startedAt: Date;
  };
  span: Span;
  ctx: Context;
  ended: boolean;
  /** the final dot is in: the message is being decided on, stored and queued */
  finishing: boolean;
  /** aborted when the client is told (421) this transaction failed: it must then never be queued */
  abandon: AbortController;
}

interface SessionState {
  ip: string;
  counted: boolean;
  span: Span;
  timer: NodeJS.Timeout | undefined;
  tx: TxState | undefined;
}

const QUIET_ERRORS = new Set([
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "SocketError",
]);

function textOf(r: Reply): string {
  return `${r.enhanced} ${r.text}`;
}

/** Writes one of our replies on a connection (a 421 also closes it). */
function sendReply(conn: SMTPConnection, r: Reply): void {
  conn.send(r.code, textOf(r));
}

function clientOf(session: SMTPServerSession): EdgeClient {
  const t = session.secure ? session.tlsOptions : false;
  const rdns = session.clientHostname;
  return {
    sessionId: session.id,
    ip: session.remoteAddress,
    port: session.remotePort,
    hostname: rdns && !rdns.startsWith("[") ? rdns : undefined,
    helo: session.hostNameAppearsAs || "",
    esmtp: session.openingCommand === "EHLO",
    tls: t ? { protocol: t.version || "TLS", cipher: t.name } : undefined,
    user: typeof session.user === "string" ? session.user : undefined,
  };
}

function asSmtpError(err: unknown): SmtpError | undefined {
  return err instanceof SmtpError ? err : undefined;
}

/** A prepended header field with CRLF line endings (the same policy as the message) and a final CRLF. */
function ensureCrlf(field: string): string {
  const crlf = field.replace(/\r\n|\r|\n/g, "\r\n");
  return crlf.endsWith("\r\n") ? crlf : `${crlf}\r\n`;
}

/**
 * An SMTPServer with everything mx and msa share: ESMTP extensions, size and recipient limits,
 * STARTTLS or implicit TLS from renewable files, PROXY protocol, connection limits overall and per
 * IP, idle/DATA/session time limits, queue IDs, tracing and metrics, line-ending normalisation,
 * durable acceptance (250 only after store + publish) and a two-phase shutdown. The service brings
 * its policy as hooks.
 */
export async function createSmtpEdge(options: SmtpEdgeOptions): Promise<SmtpEdge> {
  installSmtpServerPatches();
  const { telemetry, hooks, bus } = options;
  const { log, tracer } = telemetry;
  const budget =
    options.memoryBudget instanceof MemoryBudget
      ? options.memoryBudget
      : new MemoryBudget(options.memoryBudget ?? 512 * 1024 * 1024);
  if (budget.limit < options.maxMessageSize) {
    throw new Error(
      `SMTP_MEMORY_BUDGET (${budget.limit} bytes) is below MAX_MESSAGE_SIZE (${options.maxMessageSize} bytes): a message of the maximum size could never be accepted`,
    );
  }
  const metrics = edgeMetrics(telemetry.metrics, budget);
  const maxReceived = options.maxReceivedHeaders ?? 50;
  const acceptTimeoutMs = options.acceptTimeoutMs ?? 30_000;

  if (options.secure && !options.tls) {
    throw new Error("implicit TLS (secure) needs TLS_CERT_FILE and TLS_KEY_FILE");
  }
  const tlsPair = options.tls ? await loadTlsFiles(options.tls) : undefined;
  if (!tlsPair) {
    log.warn("TLS_CERT_FILE/TLS_KEY_FILE are not set: STARTTLS is not offered, mail arrives in clear text");
  }

  const sessions = new WeakMap<SMTPServerSession, SessionState>();

  /** A `rejected` event for a refusal in this transaction, inside its trace. */
  const emitRejected = (
    t: TxState,
    err: SmtpError,
    detail: string,
    who: { recipient?: string; recipients?: string[] },
  ): void => {
    context.with(t.ctx, () =>
      bus.emit({
        type: "rejected",
        queueId: t.tx.queueId,
        reply: err.reply,
        mailFrom: t.tx.mailFrom,
        client: { ip: t.tx.client.ip, helo: t.tx.client.helo.slice(0, 255) },
        detail,
        ...who,
      }),
    );
  };
  const perIp = new Map<string, number>();
  let draining = false;
  let listening = false;

  const connectionOf = (session: SMTPServerSession): SMTPConnection | undefined => {
    for (const c of server.connections) if (c.session === session) return c;
    return undefined;
  };

  /**
   * A 421 that may reach a client whose message is still being stored: once it is out the client
   * believes the message failed and will send it again, so that attempt must not be queued.
   */
  const closeWith = (conn: SMTPConnection, r: Reply) => {
    sessions.get(conn.session)?.tx?.abandon.abort(new SmtpError(r));
    sendReply(conn, r);
  };

  const endTx = (st: SessionState, outcome: { reply?: Reply; status?: "abandoned" }) => {
    const t = st.tx;
    if (!t || t.ended) return;
    t.ended = true;
    if (outcome.reply) {
      t.span.setAttribute(attr.replyCode, outcome.reply.code);
      t.span.setAttribute(attr.replyEnhanced, outcome.reply.enhanced);
      if (outcome.reply.code >= 400)
        t.span.setStatus({ code: SpanStatusCode.ERROR, message: String(outcome.reply.code) });
    }
    if (outcome.status) t.span.setAttribute("smtp.transaction.status", outcome.status);
    t.span.end();
  };

  /** Runs a hook in the transaction's context inside a child span; maps its failure to a reply. */
  const stage = async <T>(
    t: TxState,
    name: string,
    attributes: Record<string, string | number | boolean | string[]>,
    fn: (span: Span) => Promise<T>,
  ): Promise<T> =>
    context.with(t.ctx, () =>
      tracer.startActiveSpan(name, { kind: SpanKind.INTERNAL, attributes }, async (span) => {
        try {
          return await fn(span);
        } catch (err) {
          const smtp = asSmtpError(err) ?? new SmtpError(replies.localError(), { cause: err });
          if (!asSmtpError(err)) {
            log.error({ err, stage: name }, "hook failed; answering 451 4.3.0");
          }
          span.setAttribute(attr.replyCode, smtp.reply.code);
          span.setAttribute(attr.replyEnhanced, smtp.reply.enhanced);
          span.setStatus({
            code: SpanStatusCode.ERROR,
            message: `${smtp.reply.code} ${smtp.reply.enhanced}`,
          });
          throw smtp;
        } finally {
          span.end();
        }
      }),
    );

  const smtpOptions: SMTPServerOptions = {
    name: options.hostname,
    banner: options.banner ?? "mailpipe",
    size: options.maxMessageSize,
    hideSize: false,
    hideENHANCEDSTATUSCODES: false,
    // the pipeline does not honour DSN parameters or REQUIRETLS yet, so they are not offered
    hideDSN: true,
    hideREQUIRETLS: true,
    secure: !!options.secure,
    ...(tlsPair ? { cert: tlsPair.cert, key: tlsPair.key } : { hideSTARTTLS: true }),
    disabledCommands: [...(tlsPair ? [] : ["STARTTLS"]), ...(hooks.auth ? [] : ["AUTH"])],
    authMethods: ["PLAIN", "LOGIN"],
    authOptional: !hooks.auth,
    allowInsecureAuth: false,
    ...(options.useProxy ? { useProxy: options.useProxy } : {}),
    socketTimeout: options.idleTimeoutMs,
    maxRecipients: options.maxRecipients,
    // a backstop (it also bounds sockets still in the PROXY header or TLS handshake); our own limit
    // in onConnect answers with an enhanced code first
    maxClients: options.maxConnections * 2,
    logger: smtpServerLogger(log),
    disableReverseLookup: !options.reverseLookup,
    ...(options.reverseLookup
      ? { resolver: { reverse: reverseWith(options.reverseLookup, options.reverseLookupTimeoutMs ?? 1000) } }
      : {}),

    onConnect(session, callback) {
      const st: SessionState = {
        ip: session.remoteAddress,
        counted: false,
        timer: undefined,
        tx: undefined,
        span: tracer.startSpan(
          "smtp.session",
          {
            kind: SpanKind.SERVER,
            root: true,
            attributes: { [attr.clientAddress]: session.remoteAddress, [attr.peerPort]: session.remotePort },
          },
          ROOT_CONTEXT,
        ),
      };
      sessions.set(session, st);
      metrics.sessions.inc();
      const refuse = (r: Reply) => {
        st.span.setAttribute(attr.replyCode, r.code);
        callback(new SmtpError(r));
      };
      if (draining) return refuse(replies.shuttingDown());
      // checked and counted synchronously, so a burst from one address cannot slip past
      if (server.connections.size > options.maxConnections) return refuse(replies.tooManyConnections());
      const fromIp = perIp.get(st.ip) ?? 0;
      if (fromIp >= options.maxConnectionsPerIp) {
        log.info({ ip: st.ip, open: fromIp }, "too many connections from one address");
        return refuse(replies.tooManyConnections());
      }
      perIp.set(st.ip, fromIp + 1);
      st.counted = true;
      metrics.active.inc();
      st.timer = setTimeout(() => {
        const conn = connectionOf(session);
        log.info({ ip: st.ip, sessionId: session.id }, "session time limit reached; closing");
        if (conn) closeWith(conn, replies.timeout());
      }, options.sessionTimeoutMs);
      st.timer.unref();
      Promise.resolve()
        .then(() => hooks.connect?.(clientOf(session)))
        .then(
          () => callback(),
          (err) => {
            const smtp = asSmtpError(err);
            if (!smtp) log.error({ err }, "connect hook failed");
            callback(smtp ?? new SmtpError(replies.localError(), { cause: err }));
          },
        );
    },

    onAuth(auth, session, callback) {
      const verify = hooks.auth;
      if (!verify || (auth.method !== "PLAIN" && auth.method !== "LOGIN")) {
        return callback(new SmtpError(replies.authFailed()));
      }
      const credentials = {
        method: auth.method,
        username: auth.username ?? "",
        password: auth.password ?? "",
      };
      Promise.resolve()
        .then(() => verify(credentials, clientOf(session)))
        .then(
          (user) => (user ? callback(null, { user }) : callback(new SmtpError(replies.authFailed()))),
          (err) => {
            const smtp = asSmtpError(err);
            if (!smtp) log.error({ err }, "auth hook failed");
            callback(smtp ?? new SmtpError(replies.localError(), { cause: err }));
          },
        );
    },

    onMailFrom(address, session, callback) {
      const st = sessions.get(session);
      if (!st) return callback(new SmtpError(replies.localError()));
      if (draining) return callback(new SmtpError(replies.shuttingDown()));
      // a MAIL while a transaction is open means it was reset (RSET, EHLO, STARTTLS)
      endTx(st, { status: "abandoned" });
      const queueId = newQueueId();
      const client = clientOf(session);
      const span = tracer.startSpan(
        "smtp.transaction",
        {
          kind: SpanKind.SERVER,
          root: true,
          links: [{ context: st.span.spanContext() }],
          attributes: {
            [attr.queueId]: queueId,
            [attr.source]: options.service,
            [attr.clientAddress]: client.ip,
            "smtp.tls": !!client.tls,
            ...(client.tls ? { [attr.tlsProtocol]: client.tls.protocol } : {}),
          },
        },
        ROOT_CONTEXT,
      );
      const env = session.envelope;
      const t: TxState = {
        tx: {
          queueId,
          client,
          mailFrom: "",
          mailFromArgs: { ...(address.args || {}) },
          recipients: [],
          smtputf8: !!env.smtpUtf8,
          bodyType: env.bodyType === "8bitmime" ? "8BITMIME" : "7BIT",
          startedAt: new Date(),
        },
        span,
        ctx: contextWithQueueId(trace.setSpan(ROOT_CONTEXT, span), queueId),
        ended: false,
        finishing: false,
        abandon: new AbortController(),
      };
      st.tx = t;
      const senderDomain = address.address.slice(address.address.lastIndexOf("@") + 1);
      stage(
        t,
        "smtp.mail",
        { [attr.queueId]: queueId, ...(address.address ? { [attr.senderDomain]: senderDomain } : {}) },
        async () => {
          const declared = address.args ? Number(address.args.SIZE) : 0;
          if (declared > 0 && !budget.fits(declared)) {
            metrics.memoryRefusals.inc({ stage: "mail" });
            log.warn(
              { declared, used: budget.used, limit: budget.limit },
              "SMTP_MEMORY_BUDGET cannot hold the declared SIZE now; answering 452 4.3.1",
            );
            throw new SmtpError(replies.insufficientStorage());
          }
          if (address.address !== "") {
            const parsed = parseAddress(address.address);
            if (!parsed) throw new SmtpError(replies.badSenderSyntax());
            t.tx.mailFrom = parsed.address;
          }
          await hooks.mailFrom?.(t.tx);
        },
      ).then(
        () => callback(),
        (err: SmtpError) => {
          endTx(st, { reply: err.reply });
          callback(err);
        },
      );
    },

    onRcptTo(address, session, callback) {
      const st = sessions.get(session);
      const t = st?.tx;
      if (!st || !t || t.ended) return callback(new SmtpError(replies.localError()));
      const given = address.address;
      const at = given.lastIndexOf("@");
      const domain = at >= 0 ? given.slice(at + 1).toLowerCase() : "";
      stage(
        t,
        "smtp.rcpt",
        { [attr.queueId]: t.tx.queueId, ...(domain ? { [attr.recipientDomain]: domain } : {}) },
        async () => {
          const mapped = (await hooks.rcptTo?.(t.tx, { address: given, args: address.args || {} })) || given;
          const parsed = parseAddress(mapped);
          if (!parsed) throw new SmtpError(replies.badRecipientSyntax());
          return parsed.address;
        },
      ).then(
        (recorded) => {
          address.address = recorded;
          const key = recorded.toLowerCase();
          if (!t.tx.recipients.some((r) => r.toLowerCase() === key)) t.tx.recipients.push(recorded);
          callback();
        },
        (err: SmtpError) => {
          const valid = parseAddress(given);
          emitRejected(t, err, "recipient refused at RCPT", valid ? { recipient: valid.address } : {});
          callback(err);
        },
      );
    },

    onData(stream, session, callback) {
      const st = sessions.get(session);
      const t = st?.tx;
      if (!st || !t || t.ended) {
        stream.resume();
        return callback(new SmtpError(replies.localError()));
      }
      handleData(st, t, stream, session).then(
        (r) => {
          metrics.messages.inc({ result: "accepted" });
          endTx(st, { reply: r });
          callback(null, textOf(r));
        },
        (err: SmtpError) => {
          metrics.messages.inc({ result: "rejected" });
          emitRejected(t, err, "message refused at the end of DATA", { recipients: [...t.tx.recipients] });
          endTx(st, { reply: err.reply });
          callback(err);
        },
      );
    },

    onClose(session) {
      const st = sessions.get(session);
      if (!st) return;
      sessions.delete(session);
      clearTimeout(st.timer);
      endTx(st, { status: "abandoned" });
      if (st.counted) {
        metrics.active.dec();
        const left = (perIp.get(st.ip) ?? 1) - 1;
        if (left <= 0) perIp.delete(st.ip);
        else perIp.set(st.ip, left);
      }
      st.span.end();
    },
  };

  const handleData = async (
    st: SessionState,
    t: TxState,
    stream: SMTPServerDataStream,
    session: SMTPServerSession,
  ): Promise<Reply> => {
    const { tx } = t;
    // smtp-server resets the session right after the reply: take what we need now
    tx.client = clientOf(session);
    const recipients = [...tx.recipients];
    t.span.setAttribute(attr.recipientCount, recipients.length);
    t.span.setAttribute(attr.recipientDomain, [
      ...new Set(recipients.map((r) => r.slice(r.lastIndexOf("@") + 1))),
    ]);
    let timedOut = false;
    const dataTimer = setTimeout(() => {
      timedOut = true;
      log.info({ queueId: tx.queueId, ip: st.ip }, "DATA time limit reached; closing");
      const conn = connectionOf(session);
      if (conn) sendReply(conn, replies.timeout());
      stream.destroy(new Error("DATA time limit reached"));
    }, options.dataTimeoutMs);
    dataTimer.unref();
    stream.once("end", () => {
      clearTimeout(dataTimer);
      t.finishing = true;
    });
    const lease = budget.lease();
    try {
      return await readAndAccept(st, t, stream, lease, recipients, () => timedOut);
    } finally {
      // however the transaction ends: accepted, refused, failed, abandoned, connection lost
      lease.release();
      clearTimeout(dataTimer);
    }
  };

  const readAndAccept = async (
    st: SessionState,
    t: TxState,
    stream: SMTPServerDataStream,
    lease: ByteLease,
    recipients: string[],
    timedOut: () => boolean,
  ): Promise<Reply> => {
    const { tx } = t;
    const read = await stage(t, "smtp.data", { [attr.queueId]: tx.queueId }, async (span) => {
      let result: Awaited<ReturnType<typeof readMessage>>;
      try {
        result = await readMessage(stream, { maxBytes: options.maxMessageSize, lease });
      } catch (err) {
        if (timedOut()) throw new SmtpError(replies.timeout(), { cause: err });
        log.info({ ip: st.ip, err: (err as Error).message }, "connection lost during DATA");
        throw new SmtpError(replies.localError(), { cause: err });
      }
      span.setAttribute(attr.size, result.ok ? result.message.size : result.size);
      if (!result.ok) {
        if (result.reason === "too-big") throw new SmtpError(replies.messageTooBig(options.maxMessageSize));
        if (result.reason === "header-too-big") {
          log.info({ ip: st.ip, size: result.size }, "header block over 1 MiB; refusing the message");
          throw new SmtpError(replies.headerTooBig(MAX_HEADER_BYTES));
        }
        metrics.memoryRefusals.inc({ stage: "data" });
        log.warn(
          { ip: st.ip, used: budget.used, limit: budget.limit },
          "SMTP_MEMORY_BUDGET used up during DATA; answering 452 4.3.1",
        );
        throw new SmtpError(replies.insufficientStorage());
      }
      if (result.message.receivedCount > maxReceived) throw new SmtpError(replies.mailLoop());
      return result.message;
    });
    t.span.setAttribute(attr.size, read.size);

    return context.with(t.ctx, async () => {
      let decision: MessageDecision | undefined | void;
      try {
        decision = await hooks.message(tx, read);
      } catch (err) {
        const smtp = asSmtpError(err);
        if (!smtp) log.error({ err }, "message hook failed; answering 451 4.3.0");
        throw smtp ?? new SmtpError(replies.localError(), { cause: err });
      }
      const received = buildReceived({
        by: options.hostname,
        queueId: tx.queueId,
        ip: tx.client.ip,
        helo: tx.client.helo,
        hostname: tx.client.hostname,
        esmtp: tx.client.esmtp,
        tls: tx.client.tls,
        authenticated: !!tx.client.user,
        recipients,
        hideClient: options.hideClientInReceived,
        authenticatedUser: options.authUserInReceived ? tx.client.user : undefined,
      });
      const prepend = received + (decision?.prepend ?? []).map(ensureCrlf).join("");
      const accepted = await acceptMessage({
        bus,
        telemetry,
        queueId: tx.queueId,
        source: options.service,
        envelope: {
          mailFrom: tx.mailFrom,
          rcptTo: recipients.map((address) => ({ address })),
          smtputf8: tx.smtputf8,
          bodyType: tx.bodyType,
        },
        client: {
          ip: tx.client.ip,
          helo: tx.client.helo.slice(0, 255),
          tls: !!tx.client.tls,
          ...(tx.client.user ? { user: tx.client.user.slice(0, 320) } : {}),
        },
        prepend,
        chunks: read.chunks,
        messageId: read.messageId,
        timeoutMs: acceptTimeoutMs,
        signal: t.abandon.signal,
      });
      metrics.bytes.observe(accepted.body.size);
      try {
        await hooks.accepted?.(tx, { queueId: tx.queueId, size: accepted.body.size });
      } catch (err) {
        log.warn({ err: (err as Error)?.message }, "accepted hook failed (the message is queued)");
      }
      log.info(
        { size: accepted.body.size, recipients: recipients.length, ip: tx.client.ip },
        "message accepted",
      );
      return accepted.reply;
    });
  };

  const server = new SMTPServer(smtpOptions);
  onReplies(server, (code) => metrics.replies.inc({ code: String(code) }));
  server.on("error", (err: Error & { code?: string; meta?: { stage?: string } }) => {
    // smtp-server emits one for every client that resets its connection or fails a TLS handshake:
    // the client's problem, not ours
    const clientSide =
      (err.code && (QUIET_ERRORS.has(err.code) || err.code.startsWith("ERR_SSL"))) ||
      err.meta?.stage === "connect";
    if (clientSide) log.debug({ err: err.message, code: err.code }, "client connection error");
    else log.warn({ err: err.message, code: err.code }, "SMTP server error");
  });

  let tlsWatcher: TlsWatcher | undefined;
  if (options.tls) {
    tlsWatcher = await watchTlsFiles(
      options.tls,
      (pair) => {
        server.updateSecureContext({ cert: pair.cert, key: pair.key });
        log.info({ certFile: options.tls?.certFile }, "TLS certificate reloaded");
      },
      {
        pollIntervalMs: options.tlsPollIntervalMs ?? 5000,
        onError: (err) =>
          log.error(
            { err: err.message },
            "TLS files changed but cannot be used; keeping the previous certificate",
          ),
      },
    );
  }

  let closing: Promise<void> | undefined;
  const edge: SmtpEdge = {
    server,
    get port() {
      const a = server.server.address() as AddressInfo | null;
      return a?.port ?? 0;
    },
    get listening() {
      return listening;
    },
    get connections() {
      return server.connections.size;
    },
    listen: () =>
      new Promise<void>((resolve, reject) => {
        server.server.once("error", reject);
        server.listen(options.port, options.host ?? "0.0.0.0", () => {
          server.server.off("error", reject);
          listening = true;
          log.info(
            { host: options.host ?? "0.0.0.0", port: edge.port, tls: !!tlsPair, secure: !!options.secure },
            "SMTP listening",
          );
          resolve();
        });
      }),
    close: ({ timeoutMs = 25_000 } = {}) => {
      closing ??= (async () => {
        draining = true;
        tlsWatcher?.close();
        const closed = new Promise<void>((resolve) => server.server.close(() => resolve()));
        listening = false;
        // sockets still in the PROXY header or TLS handshake have no session to finish
        for (const s of server._pendingSockets.values()) s.destroy();
        // the last part of the time is kept for messages already received and being stored (each
        // bounded by acceptTimeoutMs itself), so that they end with 250 rather than a 421 that
        // the client would retry; transactions still sending are cut off before it
        const deadline = Date.now() + timeoutMs;
        const cutoff = deadline - Math.min(acceptTimeoutMs, timeoutMs / 2);
        const idle = (c: SMTPConnection) =>
          !c.session.envelope?.mailFrom && !c._dataStream && !c._handlerPending;
        const finishing = (c: SMTPConnection) => {
          const t = sessions.get(c.session)?.tx;
          return !!t && t.finishing && !t.ended;
        };
        let warned = false;
        while (server.connections.size > 0 && Date.now() < deadline) {
          const late = Date.now() >= cutoff;
          if (late && !warned && [...server.connections].some((c) => !idle(c) && !finishing(c))) {
            warned = true;
            log.warn(
              { open: server.connections.size },
              "transactions still being sent at the shutdown cutoff; closing them with 421",
            );
          }
          for (const c of server.connections)
            if (!c._closing && (idle(c) || (late && !finishing(c)))) sendReply(c, replies.shuttingDown());
          await new Promise((r) => setTimeout(r, 50));
        }
        if (server.connections.size > 0) {
          log.warn(
            { open: server.connections.size },
            "messages still being stored at the shutdown deadline; closing them with 421 (not queued)",
          );
          for (const c of server.connections) closeWith(c, replies.shuttingDown());
        }
        // clients get a moment to read the 421 and close; then the sockets go
        await Promise.race([closed, new Promise((r) => setTimeout(r, 1000))]);
        for (const c of server.connections) c._socket.destroy();
        await Promise.race([closed, new Promise((r) => setTimeout(r, 1000))]);
      })();
      return closing;
    },
  };
  return edge;
}

function reverseWith(lookup: (ip: string) => Promise<string[]>, timeoutMs: number) {
  return (ip: string, callback: (err: Error | null, hostnames?: string[]) => void) => {
    let done = false;
    const timer = setTimeout(() => {
      if (done) return;
      done = true;
      callback(new Error(`reverse lookup of ${ip} timed out`));
    }, timeoutMs);
    timer.unref();
    lookup(ip).then(
      (names) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        callback(null, names);
      },
      (err: Error) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        callback(err);
      },
    );
  };
}
