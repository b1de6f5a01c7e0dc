// A scriptable SMTP server standing in for a remote MX: accepts, defers, rejects or hangs per stage.
import type net from "node:net";
import { SMTPServer, type SMTPServerOptions, type SMTPServerSession } from "smtp-server";
import { type CertPair, createSelfSignedCert } from "./tls.ts";

export type PeerStage = "connect" | "ehlo" | "mail" | "rcpt" | "data";

export type Action =
  | "accept"
  /** Reply with this code; 2xx/3xx count as accepting (the text is used for DATA only). */
  | { reply: number; text?: string }
  /** Never answer; the client must time out. */
  | { hang: true }
  /**
   * Wait, then do `next` (default "accept"). Not named `then`: an object with a `then` property
   * looks like a promise to `await` (and to biome's noThenProperty).
   */
  | { delayMs: number; next?: Action };

export interface PeerContext {
  stage: PeerStage;
  /** 0-based index of this connection among all the peer's sessions. */
  connection: number;
  /**
   * 0-based index of the current transaction (MAIL command) among all the peer has seen; at the
   * connect and ehlo stages, the number of transactions so far.
   */
  transaction: number;
  remoteAddress: string;
  /** Whether the session runs over TLS (after STARTTLS). */
  tls: boolean;
  /** The EHLO/HELO name, once given. */
  helo: string | undefined;
  /** At the ehlo stage: which greeting the client used. */
  command?: "EHLO" | "HELO";
  /** The transaction so far: at mail, mailFrom is the address being offered; at rcpt, the accepted recipients. */
  envelope: { mailFrom: string | undefined; rcptTo: string[] };
  /** At the rcpt stage: the recipient being offered. */
  recipient?: string;
  /** At the data stage: the message as received (dot-unstuffed). */
  message?: Buffer;
}

export type Step = Action | ((ctx: PeerContext) => Action | Promise<Action>);

export type PeerScript = Partial<Record<PeerStage, Step>>;

export interface PeerMessage {
  mailFrom: string;
  rcptTo: string[];
  /** The exact bytes after dot-unstuffing. */
  raw: Buffer;
  tls: boolean;
  /** The TLS session the message came over, as the server saw it (what a Received header records). */
  tlsVersion?: string;
  tlsCipher?: string;
  helo: string | undefined;
  at: Date;
  remoteAddress: string;
  /** Index of the transaction, as in PeerContext. */
  transaction: number;
  /**
   * The MAIL and RCPT parameters as smtp-server parsed them (e.g. `{ RET: "HDRS" }`, and per
   * recipient `{ NOTIFY: "SUCCESS", ORCPT: "rfc822;a@b" }`); DSN's need `smtpOptions.hideDSN: false`.
   */
  mailParams: Record<string, unknown>;
  rcptParams: Record<string, Record<string, unknown>>;
}

export interface StartSmtpPeerOptions {
  /** Any 127.x.y.z works on Linux; default 127.0.0.1. */
  host?: string;
  /** Default 0: a free port. */
  port?: number;
  /** The name in the greeting and EHLO reply; default "peer.test". */
  name?: string;
  /** Offer STARTTLS with a self-signed certificate for `name` and `host`. */
  starttls?: boolean;
  /** The certificate (and key) STARTTLS offers instead of the self-signed one; implies `starttls`. */
  certificate?: CertPair;
  /** Advertised SIZE; larger messages get 552. */
  size?: number;
  script?: PeerScript;
  /** Escape hatch for smtp-server options not covered above. */
  smtpOptions?: Partial<SMTPServerOptions>;
}

export interface SmtpPeer {
  host: string;
  port: number;
  name: string;
  /** Messages accepted at DATA, oldest first. */
  messages: PeerMessage[];
  /** TCP connections accepted so far. */
  readonly connections: number;
  /** MAIL commands seen so far. */
  readonly transactions: number;
  /** TCP connections open now, and the most that were open at once. */
  readonly openConnections: number;
  readonly maxOpenConnections: number;
  /**
   * Sessions in a transaction now (from MAIL until the reply to the end of data, or the session's
   * end), and the most there were at once: what a remote server counts as concurrent deliveries.
   */
  readonly activeTransactions: number;
  readonly maxActiveTransactions: number;
  /** PEM certificate offered with STARTTLS, if any. */
  cert: string | undefined;
  /** Resolves once `n` messages were accepted; throws after `timeoutMs` (default 10 000). */
  waitForMessages(n: number, timeoutMs?: number): Promise<PeerMessage[]>;
  setScript(script: PeerScript): void;
  /** Closes the listener and destroys every open session, hung ones included. */
  stop(): Promise<void>;
}

/**
 * A step that takes the n-th action for the n-th transaction (the n-th connection at the connect
 * and ehlo stages) and repeats the last one: `{ data: sequence({ reply: 451 }, { reply: 451 }, "accept") }`.
 */
export function sequence(...steps: Step[]): (ctx: PeerContext) => Action | Promise<Action> {
  return (ctx) => {
    const n = ctx.stage === "connect" || ctx.stage === "ehlo" ? ctx.connection : ctx.transaction;
    const step = steps[Math.min(n, steps.length - 1)] ?? "accept";
    return typeof step === "function" ? step(ctx) : step;
  };
}

type Outcome = { accept: true; text?: string | undefined } | { accept: false; code: number; text: string };

function defaultText(code: number): string {
  return code >= 500 ? "5.0.0 Rejected by the test peer" : "4.0.0 Deferred by the test peer, try again later";
}

function replyError(code: number, text: string): Error {
  return Object.assign(new Error(text), { responseCode: code });
}

interface SessionState {
  connection: number;
  transaction: number;
  /** between MAIL and the reply to the end of data */
  active?: boolean;
}

function tlsSessionOf(session: SMTPServerSession): { tlsVersion?: string; tlsCipher?: string } {
  const t = (session as { tlsOptions?: { name?: string; version?: string } | false }).tlsOptions;
  if (!session.secure || !t) return {};
  return { ...(t.version ? { tlsVersion: t.version } : {}), ...(t.name ? { tlsCipher: t.name } : {}) };
}

export async function startSmtpPeer(options: StartSmtpPeerOptions = {}): Promise<SmtpPeer> {
  const host = options.host ?? "127.0.0.1";
  const name = options.name ?? "peer.test";
  let script: PeerScript = options.script ?? {};
  const messages: PeerMessage[] = [];
  const sockets = new Set<net.Socket>();
  const timers = new Set<NodeJS.Timeout>();
  const sessions = new Map<string, SessionState>();
  const waiters = new Set<() => void>();
  let connections = 0;
  let openConnections = 0;
  let maxOpenConnections = 0;
  let activeTransactions = 0;
  let maxActiveTransactions = 0;
  let sessionsStarted = 0;
  let transactions = 0;
  let stopping = false;

  const tls =
    options.certificate ??
    (options.starttls ? await createSelfSignedCert({ hostnames: [name, host] }) : undefined);

  const state = (session: SMTPServerSession): SessionState => {
    let s = sessions.get(session.id);
    if (!s) {
      s = { connection: sessionsStarted++, transaction: -1 };
      sessions.set(session.id, s);
    }
    return s;
  };

  const context = (
    stage: PeerStage,
    session: SMTPServerSession,
    extra: Partial<PeerContext> = {},
  ): PeerContext => {
    const s = state(session);
    const mailFrom = session.envelope.mailFrom;
    return {
      stage,
      connection: s.connection,
      transaction:
        s.transaction >= 0 && stage !== "connect" && stage !== "ehlo" ? s.transaction : transactions,
      remoteAddress: session.remoteAddress,
      tls: session.secure,
      helo: typeof session.hostNameAppearsAs === "string" ? session.hostNameAppearsAs : undefined,
      envelope: {
        mailFrom: mailFrom ? mailFrom.address : undefined,
        rcptTo: session.envelope.rcptTo.map((r) => r.address),
      },
      ...extra,
    };
  };

  /** Resolves the scripted step for `stage` into what to tell the client; hangs never call `done`. */
  const decide = (ctx: PeerContext, done: (outcome: Outcome) => void): void => {
    const run = (action: Action): void => {
      if (stopping || (typeof action === "object" && "hang" in action)) return;
      if (action === "accept") {
        done({ accept: true });
      } else if ("delayMs" in action) {
        const timer = setTimeout(() => {
          timers.delete(timer);
          run(action.next ?? "accept");
        }, action.delayMs);
        timers.add(timer);
      } else if (action.reply < 400) {
        done({ accept: true, text: action.text });
      } else {
        done({ accept: false, code: action.reply, text: action.text ?? defaultText(action.reply) });
      }
    };
    const step = script[ctx.stage] ?? "accept";
    if (typeof step !== "function") {
      run(step);
      return;
    }
    Promise.resolve()
      .then(() => step(ctx))
      .then(run, (err: unknown) =>
        done({ accept: false, code: 451, text: `4.3.0 Peer script failed: ${err}` }),
      );
  };

  const transactionStarts = (s: SessionState) => {
    if (s.active) return;
    s.active = true;
    activeTransactions++;
    maxActiveTransactions = Math.max(maxActiveTransactions, activeTransactions);
  };
  const transactionEnds = (s: SessionState | undefined) => {
    if (!s?.active) return;
    s.active = false;
    activeTransactions--;
  };

  const callbackOutcome = (callback: (err?: Error | null) => void) => (outcome: Outcome) => {
    callback(outcome.accept ? null : replyError(outcome.code, outcome.text));
  };

  const server = new SMTPServer({
    name,
    logger: false,
    disableReverseLookup: true,
    authOptional: true,
    // A remote MX offers no AUTH; STARTTLS only when asked for.
    disabledCommands: tls ? ["AUTH"] : ["AUTH", "STARTTLS"],
    // RFC 5321 4.5.3.2.7: a server waits 5 minutes, long enough to count as "never" in tests.
    socketTimeout: 5 * 60_000,
    closeTimeout: 1_000,
    ...(tls ? { key: tls.key, cert: tls.cert } : {}),
    ...(options.size ? { size: options.size } : {}),
    ...options.smtpOptions,

    onConnect(session, callback) {
      const ctx = context("connect", session);
      hookGreeting(session);
      decide(ctx, callbackOutcome(callback));
    },

    onMailFrom(address, session, callback) {
      const s = state(session);
      s.transaction = transactions++;
      transactionStarts(s);
      const ctx = context("mail", session);
      ctx.envelope = { mailFrom: address.address, rcptTo: [] };
      decide(ctx, (outcome) => {
        if (!outcome.accept) transactionEnds(s);
        callbackOutcome(callback)(outcome);
      });
    },

    onRcptTo(address, session, callback) {
      decide(context("rcpt", session, { recipient: address.address }), callbackOutcome(callback));
    },

    onData(stream, session, callback) {
      // The envelope is reset once the callback runs, so take it now.
      const ctx = context("data", session);
      const chunks: Buffer[] = [];
      stream.on("data", (chunk: Buffer) => chunks.push(chunk));
      stream.on("error", () => undefined); // the client went away mid-message
      stream.on("end", () => {
        const raw = Buffer.concat(chunks);
        if (stream.sizeExceeded) {
          callback(replyError(552, `5.3.4 Message size exceeds fixed limit of ${options.size} bytes`));
          return;
        }
        const paramsOf = (a: { args?: unknown } | false | undefined) =>
          a && typeof a.args === "object" && a.args !== null
            ? { ...(a.args as Record<string, unknown>) }
            : {};
        const mailParams = paramsOf(session.envelope.mailFrom);
        const rcptParams = Object.fromEntries(session.envelope.rcptTo.map((r) => [r.address, paramsOf(r)]));
        decide({ ...ctx, message: raw }, (outcome) => {
          transactionEnds(sessions.get(session.id));
          if (!outcome.accept) return callback(replyError(outcome.code, outcome.text));
          messages.push({
            mailFrom: ctx.envelope.mailFrom ?? "",
            rcptTo: ctx.envelope.rcptTo,
            raw,
            tls: ctx.tls,
            ...tlsSessionOf(session),
            helo: ctx.helo,
            at: new Date(),
            remoteAddress: ctx.remoteAddress,
            transaction: ctx.transaction,
            mailParams,
            rcptParams,
          });
          for (const wake of waiters) wake();
          callback(null, outcome.text);
        });
      });
    },

    onClose(session) {
      transactionEnds(sessions.get(session.id));
      sessions.delete(session.id);
    },
  });

  /** smtp-server has no EHLO hook: wrap this connection's EHLO/HELO handlers to run the script. */
  const hookGreeting = (session: SMTPServerSession): void => {
    const connection = [...server.connections].find((c) => c.session === session);
    if (!connection) return;
    for (const command of ["EHLO", "HELO"] as const) {
      const key = `handler_${command}` as const;
      const original = connection[key].bind(connection);
      connection[key] = (line: Buffer, callback: () => void) => {
        const given = line.toString().trim().split(/\s+/)[1];
        const ctx = context("ehlo", session, { command, helo: given?.toLowerCase() });
        decide(ctx, (outcome) => {
          if (outcome.accept) {
            original(line, callback);
          } else {
            connection.send(outcome.code, outcome.text, false);
            callback();
          }
        });
      };
    }
  };

  // Connection errors (a client timing out and resetting) must not become unhandled 'error' events.
  server.on("error", () => undefined);
  server.server.on("connection", (socket: net.Socket) => {
    connections++;
    openConnections++;
    maxOpenConnections = Math.max(maxOpenConnections, openConnections);
    sockets.add(socket);
    socket.once("close", () => {
      sockets.delete(socket);
      openConnections--;
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.server.once("error", reject);
    server.listen(options.port ?? 0, host, () => {
      server.server.off("error", reject);
      resolve();
    });
  });
  const address = server.server.address();
  const port = address && typeof address === "object" ? address.port : 0;

  let stopped: Promise<void> | undefined;
  return {
    host,
    port,
    name,
    messages,
    get connections() {
      return connections;
    },
    get transactions() {
      return transactions;
    },
    get openConnections() {
      return openConnections;
    },
    get maxOpenConnections() {
      return maxOpenConnections;
    },
    get activeTransactions() {
      return activeTransactions;
    },
    get maxActiveTransactions() {
      return maxActiveTransactions;
    },
    cert: tls?.cert,
    waitForMessages(n, timeoutMs = 10_000) {
      if (messages.length >= n) return Promise.resolve(messages.slice());
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          waiters.delete(wake);
          reject(
            new Error(`SMTP peer ${host}:${port} got ${messages.length} of ${n} messages in ${timeoutMs} ms`),
          );
        }, timeoutMs);
        const wake = () => {
          if (messages.length < n) return;
          clearTimeout(timer);
          waiters.delete(wake);
          resolve(messages.slice());
        };
        waiters.add(wake);
      });
    },
    setScript(next) {
      script = next;
    },
    stop() {
      stopped ??= new Promise<void>((resolve) => {
        stopping = true;
        for (const timer of timers) clearTimeout(timer);
        timers.clear();
        server.close(() => resolve());
        // smtp-server would wait closeTimeout for sessions to finish; hung ones never do.
        for (const socket of sockets) socket.destroy();
      });
      return stopped;
    },
  };
}
