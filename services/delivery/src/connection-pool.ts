import type { SmtpSession } from "./smtp-session.ts";

export interface PoolOptions {
  /** keep sessions after a transaction (SMTP_REUSE_CONNECTIONS) */
  reuse: boolean;
  /** transactions per session before it is closed (SMTP_MAX_MESSAGES_PER_CONNECTION) */
  maxMessages: number;
  /** an idle session is closed after this long (SMTP_IDLE_CONNECTION_TIMEOUT) */
  idleMs: number;
  /** idle sessions kept over all keys; beyond it the longest idle one is closed */
  maxIdle: number;
}

interface Idle {
  key: string;
  session: SmtpSession;
  timer: NodeJS.Timeout;
}

/**
 * Idle, healthy SMTP sessions by key, so a burst to one destination pays one TCP + EHLO + TLS
 * handshake per concurrent transaction rather than per message. Most recently used first: the
 * session least likely to have been closed by the server's own idle timer.
 */
export class ConnectionPool {
  readonly #opts: PoolOptions;
  readonly #idle = new Map<string, Idle[]>();
  /** every idle session, oldest first */
  readonly #all = new Set<Idle>();
  #closed = false;

  constructor(opts: PoolOptions) {
    this.#opts = opts;
  }

  get idleCount(): number {
    return this.#all.size;
  }

  /** An idle session for `key` that still looks connected; the caller RSETs it before use. */
  take(key: string): SmtpSession | undefined {
    const list = this.#idle.get(key);
    while (list && list.length > 0) {
      const idle = list[list.length - 1]!;
      this.#remove(idle);
      if (idle.session.usable) return idle.session;
      idle.session.destroy();
    }
    return undefined;
  }

  /** Returns a session after a successful transaction; closes it when it should not be kept. */
  put(key: string, session: SmtpSession): void {
    if (this.#closed || !this.#opts.reuse || session.messages >= this.#opts.maxMessages || !session.usable) {
      void session.quit();
      return;
    }
    if (this.#all.size >= this.#opts.maxIdle) {
      const oldest = this.#all.values().next().value!;
      this.#remove(oldest);
      void oldest.session.quit();
    }
    let list = this.#idle.get(key);
    if (!list) {
      list = [];
      this.#idle.set(key, list);
    }
    const idle: Idle = {
      key,
      session,
      timer: setTimeout(() => {
        this.#remove(idle);
        void session.quit();
      }, this.#opts.idleMs),
    };
    idle.timer.unref();
    list.push(idle);
    this.#all.add(idle);
  }

  /** QUITs every idle session (resolves when they are closed); sessions returned later are closed at once. */
  async close(): Promise<void> {
    this.#closed = true;
    const quitting: Promise<void>[] = [];
    for (const list of this.#idle.values()) {
      for (const idle of list) {
        clearTimeout(idle.timer);
        quitting.push(idle.session.quit());
      }
    }
    this.#idle.clear();
    this.#all.clear();
    await Promise.all(quitting);
  }

  #remove(idle: Idle): void {
    clearTimeout(idle.timer);
    this.#all.delete(idle);
    const list = this.#idle.get(idle.key);
    const i = list?.indexOf(idle) ?? -1;
    if (list && i >= 0) {
      list.splice(i, 1);
      if (list.length === 0) this.#idle.delete(idle.key);
    }
  }
}
