import { parseAddress, replies, SmtpError } from "@mailpipe/contracts";
import type { Directory } from "@mailpipe/directory";
import type { EdgeClient, EdgeHooks, SmtpEdge } from "@mailpipe/smtp-edge";
import type { Logger, Metrics } from "@mailpipe/telemetry";
import type { AuthGuard, Verdict } from "./auth-guard.ts";
import type { DkimSigner } from "./dkim-signer.ts";
import { submissionFixups } from "./fixups.ts";
import type { MessageRateLimiter } from "./rate-limit.ts";
import { checkEnvelopeSender, checkHeaderFrom } from "./sender-policy.ts";

export interface SubmissionPolicyOptions {
  /** the directory as it is now (it reloads) */
  directory: () => Directory;
  guard: AuthGuard;
  rate: MessageRateLimiter;
  signer: DkimSigner;
  log: Logger;
  metrics: Metrics;
  /** MAIL_HOSTNAME, for the Message-ID we add */
  hostname: string;
  recipientsPerMessage: number;
  /** the n-th AUTH refused for a lockout in one session closes it (421) */
  lockedCloseAfter: number;
}

export interface SubmissionPolicy {
  hooks: EdgeHooks;
  /** hooks a listener's server up to the parts of the policy that act on the connection itself */
  attach(edge: SmtpEdge): void;
}

/** What we keep per connection: how many AUTH attempts were refused for a lockout. */
interface SessionState {
  lockRefusals: number;
}

/** The slice of smtp-server's connection the TLS-before-AUTH check reaches into. */
interface Connection {
  id: string;
  secure: boolean;
  send(code: number, data?: string): void;
  handler_AUTH(command: Buffer, callback: () => void): void;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * The submission policy as smtp-edge hooks: AUTH against the directory behind the shared
 * brute-force guard; MAIL FROM must be the user's and within the hourly message rate; at most
 * RATE_RECIPIENTS_PER_MESSAGE recipients; at the end of DATA the header From must be the user's,
 * Message-ID and Date are added when missing, and the message is DKIM-signed for its From domain.
 */
export function createSubmissionPolicy(o: SubmissionPolicyOptions): SubmissionPolicy {
  const { log, guard, rate } = o;
  const authTotal = o.metrics.counter("msa_auth_total", "AUTH attempts by result", ["result"]);
  const rateLimited = o.metrics.counter("msa_rate_limited_total", "Submissions refused by a rate limit", [
    "limit",
  ]);
  for (const result of ["success", "failure", "locked"]) authTotal.inc({ result }, 0);
  for (const limit of ["messages", "recipients"]) rateLimited.inc({ limit }, 0);

  const edges: SmtpEdge[] = [];
  const sessions = new WeakMap<object, SessionState>();

  const connectionOf = (sessionId: string): Connection | undefined => {
    for (const edge of edges) {
      for (const c of edge.server.connections) {
        if ((c as unknown as Connection).id === sessionId) return c as unknown as Connection;
      }
    }
    return undefined;
  };

  const stateOf = (client: EdgeClient): SessionState => {
    const conn = connectionOf(client.sessionId);
    if (!conn) return { lockRefusals: 0 };
    let st = sessions.get(conn);
    if (!st) {
      st = { lockRefusals: 0 };
      sessions.set(conn, st);
    }
    return st;
  };

  const userOf = (client: EdgeClient): string => {
    // smtp-server refuses MAIL/RCPT/DATA before AUTH; this is the backstop
    if (!client.user) throw new SmtpError(replies.authRequired());
    return client.user;
  };

  const hooks: EdgeHooks = {
    connect(client) {
      const conn = connectionOf(client.sessionId);
      if (!conn || conn.secure) return;
      // smtp-server refuses AUTH before STARTTLS with a non-standard 538; RFC 3207 §4 says 530 5.7.0
      const authAfterTls = conn.handler_AUTH;
      conn.handler_AUTH = function (this: Connection, command, callback) {
        if (this.secure) return authAfterTls.call(this, command, callback);
        const r = replies.tlsRequired();
        this.send(r.code, `${r.enhanced} ${r.text}`);
        callback();
      };
    },

    async auth({ username, password }, client) {
      if (!client.tls) throw new SmtpError(replies.tlsRequired());
      const attempt = { ip: client.ip, username };
      let verdict: Verdict;
      try {
        verdict = await guard.check(attempt);
      } catch (err) {
        log.error(
          { err: (err as Error).message, ip: client.ip },
          "brute-force store unavailable; refusing AUTH for now",
        );
        throw new SmtpError(replies.authUnavailable(), { cause: err });
      }
      if (verdict.locked) {
        const st = stateOf(client);
        st.lockRefusals++;
        authTotal.inc({ result: "locked" });
        log.warn(
          { ip: client.ip, username, lockedBy: verdict.scope, retryInMs: verdict.retryInMs },
          "AUTH refused: locked out after too many failed attempts",
        );
        throw new SmtpError(
          st.lockRefusals >= o.lockedCloseAfter ? replies.authLockedOutClose() : replies.authLockedOut(),
        );
      }
      // a delay on every reply, not only on failures, so a fast answer does not give the password away
      if (verdict.delayMs > 0) await sleep(verdict.delayMs);
      const dir = o.directory();
      if (await dir.verifyPassword(username, password)) {
        const user = dir.user(username)?.address ?? username.trim().toLowerCase();
        await guard.succeeded(attempt).catch((err: Error) => {
          log.warn({ err: err.message, user }, "could not clear the failure count after a good login");
        });
        authTotal.inc({ result: "success" });
        log.info({ ip: client.ip, user }, "authenticated");
        return user;
      }
      authTotal.inc({ result: "failure" });
      try {
        const r = await guard.failed(attempt);
        log.warn(
          {
            ip: client.ip,
            username,
            failures: r.failures,
            ...(r.lockedNow.length ? { lockedNow: r.lockedNow } : {}),
          },
          "authentication failed",
        );
      } catch (err) {
        log.warn(
          { ip: client.ip, username, err: (err as Error).message },
          "authentication failed (not counted: brute-force store unavailable)",
        );
      }
      return undefined;
    },

    async mailFrom(tx) {
      const user = userOf(tx.client);
      const refused = checkEnvelopeSender(o.directory(), user, tx.mailFrom);
      if (refused) {
        log.warn(
          { user, mailFrom: tx.mailFrom, ip: tx.client.ip },
          "envelope sender refused: not the user's",
        );
        throw new SmtpError(refused);
      }
      if (!(await rate.allows(user))) {
        rateLimited.inc({ limit: "messages" });
        log.warn({ user, ip: tx.client.ip }, "message rate limit reached");
        throw new SmtpError(replies.rateLimited());
      }
    },

    rcptTo(tx, { address }) {
      userOf(tx.client);
      const key = parseAddress(address)?.address.toLowerCase();
      if (key === undefined || tx.recipients.length < o.recipientsPerMessage) return;
      if (tx.recipients.some((r) => r.toLowerCase() === key)) return;
      rateLimited.inc({ limit: "recipients" });
      log.info(
        { user: tx.client.user, limit: o.recipientsPerMessage },
        "recipient limit per message reached",
      );
      throw new SmtpError(replies.recipientRateLimited());
    },

    async message(tx, message) {
      const user = userOf(tx.client);
      const dir = o.directory();
      const from = checkHeaderFrom(dir, user, message.header("from"));
      if (!from.ok) {
        log.warn({ user, reply: from.reply.enhanced, ip: tx.client.ip }, "message refused: header From");
        throw new SmtpError(from.reply);
      }
      const fix = submissionFixups({ header: message.header, queueId: tx.queueId, hostname: o.hostname });
      // the queued record's messageId is read from the message after this hook: make it the one we add
      if (fix.added.includes("Message-ID")) message.messageId = fix.messageId;
      const fields = Buffer.from(fix.fields);
      const signature = await o.signer.sign(from.domain, dir.dkim(from.domain), [fields, ...message.chunks]);
      return { prepend: [signature, fix.fields].filter((f) => f !== "") };
    },

    // counted once the message is stored and queued; a failure here is logged by the edge, the 250 stands
    async accepted(tx, { queueId }) {
      await rate.record(userOf(tx.client), queueId);
    },
  };

  return {
    hooks,
    attach(edge) {
      edges.push(edge);
      // smtp-server's own 530 for MAIL before AUTH: with our text (its enhanced code is 5.7.0 already)
      const r = replies.authRequired();
      edge.server.options.authRequiredMessage = `${r.enhanced} ${r.text}`;
    },
  };
}
