// Connection stage: the greeting, connection limits overall and per IP, the session span and time
// limit, the service's connect hook, reverse DNS, and the end of a session.
import { type Reply, replies, SmtpError } from "@mailpipe/contracts";
import { attr, type Logger, SpanKind } from "@mailpipe/telemetry";
import { ROOT_CONTEXT } from "@opentelemetry/api";
import type { SMTPServer, SMTPServerOptions } from "smtp-server";
import { asSmtpError, clientOf, type EdgeContext, type SessionState } from "./edge-context.ts";
import type { SmtpEdgeOptions } from "./options.ts";

const QUIET_ERRORS = new Set([
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "SocketError",
]);

/** smtp-server options for the connection: greeting, limits, idle time, PROXY protocol, reverse DNS. */
export function connectionOptions(options: SmtpEdgeOptions): SMTPServerOptions {
  return {
    name: options.hostname,
    banner: options.banner ?? "mailpipe",
    ...(options.useProxy ? { useProxy: options.useProxy } : {}),
    socketTimeout: options.idleTimeoutMs,
    // a backstop (it also bounds sockets still in the PROXY header or TLS handshake); our own limit
    // in onConnect answers with an enhanced code first
    maxClients: options.maxConnections * 2,
    disableReverseLookup: !options.reverseLookup,
    ...(options.reverseLookup
      ? { resolver: { reverse: reverseWith(options.reverseLookup, options.reverseLookupTimeoutMs ?? 1000) } }
      : {}),
  };
}

export function connectionHandlers(edge: EdgeContext): Pick<SMTPServerOptions, "onConnect" | "onClose"> {
  const { options, hooks, log, tracer, metrics, sessions, perIp } = edge;
  return {
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
      if (edge.draining) return refuse(replies.shuttingDown());
      // checked and counted synchronously, so a burst from one address cannot slip past
      if (edge.server.connections.size > options.maxConnections) return refuse(replies.tooManyConnections());
      const fromIp = perIp.get(st.ip) ?? 0;
      if (fromIp >= options.maxConnectionsPerIp) {
        log.info({ ip: st.ip, open: fromIp }, "too many connections from one address");
        return refuse(replies.tooManyConnections());
      }
      perIp.set(st.ip, fromIp + 1);
      st.counted = true;
      metrics.active.inc();
      st.timer = setTimeout(() => {
        const conn = edge.connectionOf(session);
        log.info({ ip: st.ip, sessionId: session.id }, "session time limit reached; closing");
        if (conn) edge.closeWith(conn, replies.timeout());
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

    onClose(session) {
      const st = sessions.get(session);
      if (!st) return;
      sessions.delete(session);
      clearTimeout(st.timer);
      edge.endTx(st, { status: "abandoned" });
      if (st.counted) {
        metrics.active.dec();
        const left = (perIp.get(st.ip) ?? 1) - 1;
        if (left <= 0) perIp.delete(st.ip);
        else perIp.set(st.ip, left);
      }
      st.span.end();
    },
  };
}

/** Connection errors are logged quietly when they are the client's doing. */
export function logServerErrors(server: SMTPServer, log: Logger): void {
  server.on("error", (err: Error & { code?: string; meta?: { stage?: string } }) => {
    // smtp-server emits one for every client that resets its connection or fails a TLS handshake:
    // the client's problem, not ours
    const clientSide =
      (err.code && (QUIET_ERRORS.has(err.code) || err.code.startsWith("ERR_SSL"))) ||
      err.meta?.stage === "connect";
    if (clientSide) log.debug({ err: err.message, code: err.code }, "client connection error");
    else log.warn({ err: err.message, code: err.code }, "SMTP server error");
  });
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
