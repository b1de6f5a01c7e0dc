// DATA stage: the DATA time limit, reading the message within the memory budget (size, header and
// loop checks), the service's message hook, our Received field, the content filter (when there is
// one), and durable acceptance: the 250 goes out only once the body is stored and the queue entry
// published.
import { type FilterVerdict, type Reply, replies, SmtpError } from "@mailpipe/contracts";
import { attr } from "@mailpipe/telemetry";
import { context } from "@opentelemetry/api";
import type { SMTPServerDataStream, SMTPServerOptions, SMTPServerSession } from "smtp-server";
import { acceptMessage } from "./accept.ts";
import {
  asSmtpError,
  clientOf,
  type EdgeContext,
  type SessionState,
  sendReply,
  type TxState,
  textOf,
} from "./edge-context.ts";
import { type ContentFilter, SPAM_HEADERS, verdictOf } from "./filter.ts";
import type { MessageDecision } from "./hooks.ts";
import { type ByteLease, type IncomingMessage, MAX_HEADER_BYTES, readMessage } from "./intake.ts";
import { buildReceived } from "./received.ts";

/** A prepended header field with CRLF line endings (the same policy as the message) and a final CRLF. */
function ensureCrlf(field: string): string {
  const crlf = field.replace(/\r\n|\r|\n/g, "\r\n");
  return crlf.endsWith("\r\n") ? crlf : `${crlf}\r\n`;
}

export function dataHandler(edge: EdgeContext): Pick<SMTPServerOptions, "onData"> {
  const { options, hooks, bus, telemetry, log, metrics, budget, sessions } = edge;

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
      const conn = edge.connectionOf(session);
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
    const read = await edge.stage(t, "smtp.data", { [attr.queueId]: tx.queueId }, async (span) => {
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
      if (result.message.receivedCount > edge.maxReceived) throw new SmtpError(replies.mailLoop());
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
      let prepend: string | Buffer = received + (decision?.prepend ?? []).map(ensureCrlf).join("");
      let chunks: readonly Buffer[] = read.chunks;
      if (edge.filter) ({ prepend, chunks } = await filterMessage(edge.filter, t, read, prepend, recipients));
      const accepted = await acceptMessage({
        bus,
        telemetry,
        queueId: tx.queueId,
        source: options.service,
        envelope: {
          mailFrom: tx.mailFrom,
          rcptTo: recipients.map((address) => ({ address, ...tx.rcptDsn.get(address.toLowerCase()) })),
          smtputf8: tx.smtputf8,
          bodyType: tx.bodyType,
          ...(tx.dsn ? { dsn: tx.dsn } : {}),
        },
        client: {
          ip: tx.client.ip,
          helo: tx.client.helo.slice(0, 255),
          tls: !!tx.client.tls,
          ...(tx.client.user ? { user: tx.client.user.slice(0, 320) } : {}),
        },
        prepend,
        chunks,
        messageId: read.messageId,
        timeoutMs: edge.acceptTimeoutMs,
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

  /** The content filter's check in its own span; emits `filtered`; throws the refusal, if any. */
  const filterMessage = (
    filter: ContentFilter,
    t: TxState,
    read: IncomingMessage,
    prepend: string,
    recipients: string[],
  ) => {
    const { tx } = t;
    const url = filter.client.url;
    return edge.stage(
      t,
      "filter.check",
      {
        [attr.queueId]: tx.queueId,
        [attr.serverAddress]: url.hostname,
        [attr.serverPort]: Number(url.port || (url.protocol === "https:" ? 443 : 80)),
      },
      async (span) => {
        const emit = (verdict: FilterVerdict | undefined) => {
          if (!verdict) return;
          span.setAttribute("mail.filter.action", verdict.action);
          if (verdict.score !== undefined) span.setAttribute("mail.filter.score", verdict.score);
          bus.emit({
            type: "filtered",
            queueId: tx.queueId,
            mailFrom: tx.mailFrom,
            recipients,
            ...(read.messageId ? { messageId: read.messageId } : {}),
            filter: verdict,
          });
        };
        try {
          const out = await filter.check(
            {
              queueId: tx.queueId,
              mailFrom: tx.mailFrom,
              recipients,
              ip: tx.client.ip,
              helo: tx.client.helo,
              hostname: tx.client.hostname,
              user: tx.client.user,
              tls: tx.client.tls,
              mtaName: options.hostname,
              prepend,
              chunks: read.chunks,
              size: read.size,
              hasSpamHeaders: SPAM_HEADERS.some((h) => read.header(h).length > 0),
              smtputf8: tx.smtputf8,
            },
            t.abandon.signal,
          );
          emit(out.verdict);
          return out;
        } catch (err) {
          emit(verdictOf(err));
          throw err;
        }
      },
    );
  };

  return {
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
          edge.endTx(st, { reply: r });
          callback(null, textOf(r));
        },
        (err: SmtpError) => {
          metrics.messages.inc({ result: "rejected" });
          edge.emitRejected(t, err, "message refused at the end of DATA", {
            recipients: [...t.tx.recipients],
          });
          edge.endTx(st, { reply: err.reply });
          callback(err);
        },
      );
    },
  };
}
