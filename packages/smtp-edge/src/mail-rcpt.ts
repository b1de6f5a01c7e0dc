// MAIL and RCPT stage: a queue ID, span and trace context per transaction, the memory budget
// against the declared SIZE, address syntax, and the service's sender and recipient policy.
import {
  type DsnNotify,
  type EnvelopeDsn,
  newQueueId,
  parseAddress,
  replies,
  SmtpError,
} from "@mailpipe/contracts";
import { attr, contextWithQueueId, SpanKind } from "@mailpipe/telemetry";
import { ROOT_CONTEXT, trace } from "@opentelemetry/api";
import type { SMTPServerOptions } from "smtp-server";
import { clientOf, type EdgeContext, type TxState } from "./edge-context.ts";

export function mailRcptHandlers(edge: EdgeContext): Pick<SMTPServerOptions, "onMailFrom" | "onRcptTo"> {
  const { options, hooks, log, tracer, metrics, budget, sessions } = edge;
  return {
    onMailFrom(address, session, callback) {
      const st = sessions.get(session);
      if (!st) return callback(new SmtpError(replies.localError()));
      if (edge.draining) return callback(new SmtpError(replies.shuttingDown()));
      // a MAIL while a transaction is open means it was reset (RSET, EHLO, STARTTLS)
      edge.endTx(st, { status: "abandoned" });
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
          rcptDsn: new Map(),
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
      edge
        .stage(
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
            const dsn = mailDsn(address.args || {});
            if (dsn) t.tx.dsn = dsn;
            await hooks.mailFrom?.(t.tx);
          },
        )
        .then(
          () => callback(),
          (err: SmtpError) => {
            edge.endTx(st, { reply: err.reply });
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
      edge
        .stage(
          t,
          "smtp.rcpt",
          { [attr.queueId]: t.tx.queueId, ...(domain ? { [attr.recipientDomain]: domain } : {}) },
          async () => {
            const mapped =
              (await hooks.rcptTo?.(t.tx, { address: given, args: address.args || {} })) || given;
            const dsn = rcptDsn(address.args || {});
            const parsed = parseAddress(mapped);
            if (!parsed) throw new SmtpError(replies.badRecipientSyntax());
            return { address: parsed.address, dsn };
          },
        )
        .then(
          ({ address: recorded, dsn }) => {
            address.address = recorded;
            const key = recorded.toLowerCase();
            if (!t.tx.recipients.some((r) => r.toLowerCase() === key)) t.tx.recipients.push(recorded);
            // a repeated RCPT replaces the earlier one's parameters, as smtp-server replaces the entry
            if (dsn) t.tx.rcptDsn.set(key, dsn);
            else t.tx.rcptDsn.delete(key);
            callback();
          },
          (err: SmtpError) => {
            const valid = parseAddress(given);
            edge.emitRejected(t, err, "recipient refused at RCPT", valid ? { recipient: valid.address } : {});
            callback(err);
          },
        );
    },
  };
}

/** RET and ENVID of a MAIL command (RET's value smtp-server has checked). */
function mailDsn(args: Record<string, string | true>): EnvelopeDsn | undefined {
  const dsn: EnvelopeDsn = {};
  if (typeof args.RET === "string") dsn.ret = args.RET.toUpperCase() === "HDRS" ? "HDRS" : "FULL";
  if (args.ENVID !== undefined) {
    // smtp-server has decoded the xtext (and refused control characters)
    const envid = typeof args.ENVID === "string" ? args.ENVID : null;
    if (!envid || envid.length > 100 || !/^[\x20-\x7e]+$/.test(envid)) {
      throw new SmtpError(
        replies.badDsnParameter(
          "ENVID must be xtext of at most 100 printable ASCII characters (RFC 3461 4.4)",
        ),
      );
    }
    dsn.envid = envid;
  }
  return dsn.ret || dsn.envid ? dsn : undefined;
}

/** NOTIFY and ORCPT of a RCPT command (NOTIFY's values and ORCPT's form smtp-server has checked). */
function rcptDsn(
  args: Record<string, string | true>,
): { notify?: DsnNotify[]; original?: string } | undefined {
  const out: { notify?: DsnNotify[]; original?: string } = {};
  if (typeof args.NOTIFY === "string") {
    out.notify = [...new Set(args.NOTIFY.toUpperCase().split(","))] as DsnNotify[];
  }
  if (typeof args.ORCPT === "string") {
    const semi = args.ORCPT.indexOf(";");
    const type = args.ORCPT.slice(0, semi).toLowerCase();
    // smtp-server has checked the addr-type;value form and decoded the xtext
    const decoded = args.ORCPT.slice(semi + 1);
    // an rfc822 (or utf-8) original that is an address is kept for Original-Recipient; other types
    // (x400, …) are not reported
    const parsed = type === "rfc822" || type === "utf-8" ? parseAddress(decoded) : null;
    if ((type === "rfc822" || type === "utf-8") && !parsed) {
      throw new SmtpError(replies.badDsnParameter("ORCPT rfc822 value is not an address"));
    }
    if (parsed) out.original = parsed.address;
  }
  return out.notify || out.original ? out : undefined;
}
