// The state one edge's stages share (sessions, transactions, connection counts, the drain flag)
// and the helpers each stage uses to run a hook, reply, refuse and end a transaction.
import type { Bus } from "@mailpipe/bus";
import { type DsnNotify, type EnvelopeDsn, type Reply, replies, SmtpError } from "@mailpipe/contracts";
import { attr, type Logger, type Span, SpanKind, SpanStatusCode, type Telemetry } from "@mailpipe/telemetry";
import { type Context, context, type Tracer } from "@opentelemetry/api";
import type { SMTPServer, SMTPServerSession } from "smtp-server";
import type { SMTPConnection } from "smtp-server/lib/smtp-connection.js";
import type { ContentFilter } from "./filter.ts";
import type { EdgeClient, EdgeHooks } from "./hooks.ts";
import type { MemoryBudget } from "./memory-budget.ts";
import type { EdgeMetrics } from "./metrics.ts";
import type { SmtpEdgeOptions } from "./options.ts";

export interface TxState {
  tx: {
    queueId: string;
    client: EdgeClient;
    mailFrom: string;
    mailFromArgs: Record<string, string | true>;
    recipients: string[];
    /** RFC 3461 RET and ENVID from MAIL */
    dsn?: EnvelopeDsn;
    /** RFC 3461 NOTIFY and ORCPT per accepted recipient (lower-cased address) */
    rcptDsn: Map<string, { notify?: DsnNotify[]; original?: string }>;
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

export interface SessionState {
  ip: string;
  counted: boolean;
  span: Span;
  timer: NodeJS.Timeout | undefined;
  tx: TxState | undefined;
}

export function textOf(r: Reply): string {
  return `${r.enhanced} ${r.text}`;
}

/** Writes one of our replies on a connection (a 421 also closes it). */
export function sendReply(conn: SMTPConnection, r: Reply): void {
  conn.send(r.code, textOf(r));
}

export function clientOf(session: SMTPServerSession): EdgeClient {
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

export function asSmtpError(err: unknown): SmtpError | undefined {
  return err instanceof SmtpError ? err : undefined;
}

export class EdgeContext {
  readonly options: SmtpEdgeOptions;
  readonly hooks: EdgeHooks;
  readonly bus: Bus;
  readonly telemetry: Telemetry;
  readonly log: Logger;
  readonly tracer: Tracer;
  readonly budget: MemoryBudget;
  readonly metrics: EdgeMetrics;
  readonly maxReceived: number;
  readonly acceptTimeoutMs: number;
  /** the content filter, when RSPAMD_URL is set */
  readonly filter: ContentFilter | undefined;
  readonly sessions = new WeakMap<SMTPServerSession, SessionState>();
  /** open, counted connections per client IP */
  readonly perIp = new Map<string, number>();
  /** set by close(): no new connections or transactions */
  draining = false;
  /** set once, right after the stages' handlers are built */
  server!: SMTPServer;

  constructor(options: SmtpEdgeOptions, budget: MemoryBudget, metrics: EdgeMetrics) {
    this.options = options;
    this.hooks = options.hooks;
    this.bus = options.bus;
    this.telemetry = options.telemetry;
    this.log = options.telemetry.log;
    this.tracer = options.telemetry.tracer;
    this.budget = budget;
    this.metrics = metrics;
    this.maxReceived = options.maxReceivedHeaders ?? 50;
    this.acceptTimeoutMs = options.acceptTimeoutMs ?? 30_000;
    this.filter = options.filter;
  }

  connectionOf(session: SMTPServerSession): SMTPConnection | undefined {
    for (const c of this.server.connections) if (c.session === session) return c;
    return undefined;
  }

  /**
   * A 421 that may reach a client whose message is still being stored: once it is out the client
   * believes the message failed and will send it again, so that attempt must not be queued.
   */
  closeWith(conn: SMTPConnection, r: Reply): void {
    this.sessions.get(conn.session)?.tx?.abandon.abort(new SmtpError(r));
    sendReply(conn, r);
  }

  endTx(st: SessionState, outcome: { reply?: Reply; status?: "abandoned" }): void {
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
  }

  /** Runs a hook in the transaction's context inside a child span; maps its failure to a reply. */
  stage<T>(
    t: TxState,
    name: string,
    attributes: Record<string, string | number | boolean | string[]>,
    fn: (span: Span) => Promise<T>,
  ): Promise<T> {
    return context.with(t.ctx, () =>
      this.tracer.startActiveSpan(name, { kind: SpanKind.INTERNAL, attributes }, async (span) => {
        try {
          return await fn(span);
        } catch (err) {
          const smtp = asSmtpError(err) ?? new SmtpError(replies.localError(), { cause: err });
          if (!asSmtpError(err)) {
            this.log.error({ err, stage: name }, "hook failed; answering 451 4.3.0");
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
  }

  /** A `rejected` event for a refusal in this transaction, inside its trace. */
  emitRejected(
    t: TxState,
    err: SmtpError,
    detail: string,
    who: { recipient?: string; recipients?: string[] },
  ): void {
    context.with(t.ctx, () =>
      this.bus.emit({
        type: "rejected",
        queueId: t.tx.queueId,
        reply: err.reply,
        mailFrom: t.tx.mailFrom,
        client: { ip: t.tx.client.ip, helo: t.tx.client.helo.slice(0, 255) },
        detail,
        ...who,
      }),
    );
  }
}
