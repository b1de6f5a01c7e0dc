// LMTP (RFC 2033) to Dovecot, on nodemailer's SMTPConnection with `lmtp: true`: LHLO, and after
// DATA one reply per recipient. Every use of nodemailer internals (names starting with `_`) is in
// this file. A small pool keeps connections open between requests.
import net from "node:net";
import type { Readable } from "node:stream";
import { parseRemoteReply, type Reply, replies } from "@mailpipe/contracts";
import SMTPConnection from "nodemailer/lib/smtp-connection";

export type LmtpTarget = { kind: "unix"; path: string } | { kind: "tcp"; host: string; port: number };

/** `unix:/run/dovecot/lmtp` or `lmtp://host:port` (port 24 when left out). */
export function parseLmtpUrl(url: string): LmtpTarget {
  if (url.startsWith("unix:")) {
    const path = url.slice("unix:".length).replace(/^\/\/(?=\/)/, "");
    if (!path.startsWith("/")) throw new Error(`LMTP_URL ${url}: a unix socket needs an absolute path`);
    return { kind: "unix", path };
  }
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new Error(`LMTP_URL ${JSON.stringify(url)} is neither unix:/path nor lmtp://host:port`);
  }
  if (u.protocol !== "lmtp:" || !u.hostname) {
    throw new Error(`LMTP_URL ${JSON.stringify(url)} is neither unix:/path nor lmtp://host:port`);
  }
  return { kind: "tcp", host: u.hostname.replace(/^\[|\]$/g, ""), port: u.port ? Number(u.port) : 24 };
}

export function describeTarget(t: LmtpTarget): string {
  return t.kind === "unix" ? `unix:${t.path}` : `lmtp://${t.host}:${t.port}`;
}

/** A reply as nodemailer read it off the wire (`552 5.2.2 <u@d> Quota exceeded`), kept as sent. */
export function replyFromLine(response: string | undefined): Reply | undefined {
  if (!response) return undefined;
  const code = Number(/^(\d{3})/.exec(response)?.[1]);
  if (!(code >= 200 && code <= 599)) return undefined;
  const text = response
    .split(/\r?\n/)
    .map((l) => l.replace(/^\d{3}[ -]?/, "").trim())
    .filter(Boolean)
    .join(" ");
  return parseRemoteReply(code, text);
}

export interface LmtpOptions {
  target: LmtpTarget;
  /** the LHLO name (MAIL_HOSTNAME) */
  name: string;
  /** connections open at most */
  poolSize: number;
  /** reply timeout of each step, and of connecting (ms) */
  timeoutMs: number;
  /** an idle connection older than this is closed rather than reused (ms) */
  idleMs?: number;
}

export interface LmtpEnvelope {
  from: string;
  to: string;
}

/** What happened to one recipient: the server's reply, or a failure on our side of the line. */
export type LmtpOutcome =
  | { kind: "reply"; reply: Reply }
  /** no reply: could not connect, or the connection broke or timed out (the reply says which) */
  | { kind: "failed"; reply: Reply; detail: string };

interface ClientError extends Error {
  code?: string;
  response?: string;
  responseCode?: number;
  rejectedErrors?: ClientError[];
}

interface Internals {
  _socket?: net.Socket;
  _destroyed?: boolean;
  _closing?: boolean;
}

class Session {
  lastUsed = performance.now();
  #lastError: ClientError | undefined;
  readonly conn: SMTPConnection;
  private constructor(conn: SMTPConnection) {
    this.conn = conn;
    // errors also reach the callbacks; without a listener an 'error' event would crash the process
    conn.on("error", (err: ClientError) => {
      this.#lastError = err;
    });
  }

  static async open(o: LmtpOptions): Promise<Session> {
    const t = o.target;
    let socket: net.Socket | undefined;
    if (t.kind === "unix") {
      socket = await new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect({ path: t.path });
        const timer = setTimeout(() => {
          s.destroy();
          reject(Object.assign(new Error(`no connection within ${o.timeoutMs} ms`), { code: "ETIMEDOUT" }));
        }, o.timeoutMs);
        s.once("connect", () => {
          clearTimeout(timer);
          s.removeAllListeners("error");
          resolve(s);
        });
        s.once("error", (err) => {
          clearTimeout(timer);
          reject(err);
        });
      });
    }
    const conn = new SMTPConnection({
      lmtp: true,
      name: o.name,
      ...(socket
        ? { connection: socket }
        : { host: t.kind === "tcp" ? t.host : "", port: (t as { port: number }).port }),
      ignoreTLS: true,
      connectionTimeout: o.timeoutMs,
      greetingTimeout: o.timeoutMs,
      socketTimeout: o.timeoutMs,
      logger: false,
    } as ConstructorParameters<typeof SMTPConnection>[0]);
    const session = new Session(conn);
    await session.#settle<void>((resolve, reject) => conn.connect((err) => (err ? reject(err) : resolve())));
    return session;
  }

  get usable(): boolean {
    const i = this.conn as unknown as Internals;
    const s = i._socket;
    return !i._destroyed && !i._closing && !!s && !s.destroyed && s.writable;
  }

  send(env: LmtpEnvelope, body: Readable | Buffer): Promise<{ response: string; rejected?: ClientError }> {
    return this.#settle((resolve, reject) => {
      this.conn.send({ from: env.from, to: [env.to], use8BitMime: true }, body, (err, info) => {
        if (err) reject(err);
        else {
          const i = info as unknown as { response: string; rejectedErrors?: ClientError[] };
          resolve({ response: i.response, rejected: i.rejectedErrors?.[0] });
        }
      });
    });
  }

  reset(): Promise<void> {
    return this.#settle((resolve, reject) => this.conn.reset((err) => (err ? reject(err) : resolve())));
  }

  quit(): void {
    if (this.usable) this.conn.quit();
    else this.conn.close();
  }

  destroy(): void {
    this.conn.close();
  }

  /** Runs one operation; the connection ending without a callback rejects with the last error. */
  #settle<T>(run: (resolve: (v: T) => void, reject: (err: ClientError) => void) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let done = false;
      const finish = (f: () => void) => {
        if (done) return;
        done = true;
        this.conn.off("end", onEnd);
        f();
      };
      const onEnd = () =>
        // nodemailer ends the connection before it calls back with the error: let that error win
        setImmediate(() =>
          finish(() =>
            reject(this.#lastError ?? Object.assign(new Error("connection closed"), { code: "ECONNECTION" })),
          ),
        );
      this.conn.once("end", onEnd);
      try {
        run(
          (v) => finish(() => resolve(v)),
          (err) => finish(() => reject(err)),
        );
      } catch (err) {
        finish(() => reject(err as ClientError));
      }
    });
  }
}

/** A pool of LMTP connections to one server; one recipient per transaction. */
export class LmtpClient {
  readonly #o: LmtpOptions;
  readonly #idle: Session[] = [];
  readonly #waiting: ((s: Session | undefined) => void)[] = [];
  #open = 0;
  #closed = false;

  constructor(options: LmtpOptions) {
    this.#o = options;
  }

  get target(): string {
    return describeTarget(this.#o.target);
  }

  /**
   * One transaction for one recipient. A reply from the server (2xx, 4xx, 5xx, at RCPT or after
   * DATA) comes back as it was sent; no reply at all is a `failed` outcome with a 4xx of ours.
   * `body` is called once the envelope is accepted.
   */
  async deliver(env: LmtpEnvelope, body: () => Promise<Readable | Buffer>): Promise<LmtpOutcome> {
    let session: Session;
    try {
      session = await this.#acquire();
    } catch (err) {
      const e = err as ClientError;
      const detail = `${this.target}: ${e.message}`;
      return { kind: "failed", reply: replies.connectionFailed(detail), detail };
    }
    let data: Readable | Buffer;
    try {
      data = await body();
    } catch (err) {
      this.#release(session);
      throw err;
    }
    try {
      const r = await session.send(env, data);
      this.#release(session);
      const line = r.rejected?.response ?? r.response;
      const reply = replyFromLine(line);
      if (!reply) {
        const detail = `${this.target}: unreadable reply ${JSON.stringify(line?.slice(0, 200))}`;
        return { kind: "failed", reply: replies.connectionLost(detail), detail };
      }
      return { kind: "reply", reply };
    } catch (err) {
      const e = err as ClientError;
      const rejected = e.rejectedErrors?.[0]?.response ?? (e.code === "EENVELOPE" ? e.response : undefined);
      const reply = replyFromLine(rejected ?? (e.code === "EMESSAGE" ? e.response : undefined));
      if (reply) {
        // refused at MAIL or RCPT: the connection is fine, the transaction needs a RSET
        await this.#resetAndRelease(session);
        return { kind: "reply", reply };
      }
      if (typeof (data as Readable).destroy === "function") (data as Readable).destroy();
      this.#discard(session);
      const detail = `${this.target}: ${e.message}`;
      return { kind: "failed", reply: replies.connectionLost(detail), detail };
    }
  }

  /** QUIT on idle connections; those in use close after their transaction. */
  close(): void {
    this.#closed = true;
    for (const s of this.#idle.splice(0)) {
      this.#open--;
      s.quit();
    }
    for (const w of this.#waiting.splice(0)) w(undefined);
  }

  async #acquire(): Promise<Session> {
    if (this.#closed) throw new Error("LMTP client closed");
    const idleMs = this.#o.idleMs ?? 30_000;
    while (this.#idle.length) {
      const s = this.#idle.pop()!;
      if (s.usable && performance.now() - s.lastUsed < idleMs) return s;
      this.#open--;
      s.quit();
    }
    if (this.#open < this.#o.poolSize) {
      this.#open++;
      try {
        return await Session.open(this.#o);
      } catch (err) {
        this.#open--;
        this.#wakeOne();
        throw err;
      }
    }
    const s = await new Promise<Session | undefined>((resolve) => this.#waiting.push(resolve));
    if (!s) return this.#acquire();
    return s;
  }

  #release(s: Session): void {
    s.lastUsed = performance.now();
    if (this.#closed || !s.usable) {
      this.#discard(s);
      return;
    }
    const w = this.#waiting.shift();
    if (w) w(s);
    else this.#idle.push(s);
  }

  async #resetAndRelease(s: Session): Promise<void> {
    try {
      await s.reset();
      this.#release(s);
    } catch {
      this.#discard(s);
    }
  }

  #discard(s: Session): void {
    this.#open--;
    s.destroy();
    this.#wakeOne();
  }

  /** a slot freed up: a waiter opens its own connection */
  #wakeOne(): void {
    const w = this.#waiting.shift();
    if (w) w(undefined);
  }
}
