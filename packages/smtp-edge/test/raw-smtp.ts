// A raw SMTP client for tests (exported as "@mailpipe/smtp-edge/testing"): exact bytes out, exact
// replies in, so tests can send what real clients would not (bare LFs, relay tricks, pipelining).
import net from "node:net";
import tls from "node:tls";

export interface SmtpReply {
  code: number;
  /** the enhanced status code at the start of the last line's text, when there is one */
  enhanced: string | undefined;
  /** the last line's text after the code (and enhanced code) */
  text: string;
  /** every line, as received */
  lines: string[];
}

export interface RawConnectOptions {
  host?: string;
  port: number;
  localAddress?: string;
  /** implicit TLS */
  tls?: boolean;
  /** per reply, default 10 s */
  timeoutMs?: number;
  /** a PROXY protocol v1 line to send first, e.g. `PROXY TCP4 198.51.100.7 127.0.0.1 40000 25` */
  proxyHeader?: string;
}

function parseReply(lines: string[]): SmtpReply {
  const last = lines[lines.length - 1] ?? "";
  const code = Number(last.slice(0, 3));
  const rest = last.slice(4);
  const m = /^([245]\.\d{1,3}\.\d{1,3}) (.*)$/s.exec(rest);
  return { code, enhanced: m?.[1], text: m ? (m[2] ?? "") : rest, lines };
}

export class RawSmtp {
  greeting!: SmtpReply;
  #socket: net.Socket | tls.TLSSocket;
  #buffer = "";
  #lines: string[] = [];
  #replies: SmtpReply[] = [];
  #waiters: ((r: SmtpReply | Error) => void)[] = [];
  #closed = false;
  #closedWaiters: (() => void)[] = [];
  readonly #timeoutMs: number;

  private constructor(socket: net.Socket | tls.TLSSocket, timeoutMs: number) {
    this.#socket = socket;
    this.#timeoutMs = timeoutMs;
    this.#attach(socket);
  }

  static async connect(opts: RawConnectOptions): Promise<RawSmtp> {
    const host = opts.host ?? "127.0.0.1";
    const socket = await new Promise<net.Socket | tls.TLSSocket>((resolve, reject) => {
      const s = opts.tls
        ? tls.connect({
            host,
            port: opts.port,
            rejectUnauthorized: false,
            ...(opts.localAddress ? { localAddress: opts.localAddress } : {}),
          })
        : net.connect({
            host,
            port: opts.port,
            ...(opts.localAddress ? { localAddress: opts.localAddress } : {}),
          });
      s.once(opts.tls ? "secureConnect" : "connect", () => resolve(s));
      s.once("error", reject);
    });
    const c = new RawSmtp(socket, opts.timeoutMs ?? 10_000);
    if (opts.proxyHeader) c.write(`${opts.proxyHeader}\r\n`);
    c.greeting = await c.read();
    return c;
  }

  #attach(socket: net.Socket | tls.TLSSocket): void {
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => {
      this.#buffer += chunk;
      let nl = this.#buffer.indexOf("\r\n");
      while (nl >= 0) {
        const line = this.#buffer.slice(0, nl);
        this.#buffer = this.#buffer.slice(nl + 2);
        this.#lines.push(line);
        if (/^\d{3}(?: |$)/.test(line)) {
          const reply = parseReply(this.#lines);
          this.#lines = [];
          const waiter = this.#waiters.shift();
          if (waiter) waiter(reply);
          else this.#replies.push(reply);
        }
        nl = this.#buffer.indexOf("\r\n");
      }
    });
    socket.on("error", () => {});
    socket.on("close", () => {
      this.#closed = true;
      for (const w of this.#waiters.splice(0)) w(new Error("connection closed"));
      for (const w of this.#closedWaiters.splice(0)) w();
    });
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** The next reply; rejects when none comes within the timeout or the connection closes first. */
  read(timeoutMs = this.#timeoutMs): Promise<SmtpReply> {
    const queued = this.#replies.shift();
    if (queued) return Promise.resolve(queued);
    if (this.#closed) return Promise.reject(new Error("connection closed"));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        reject(new Error(`no SMTP reply within ${timeoutMs} ms`));
      }, timeoutMs);
      const waiter = (r: SmtpReply | Error) => {
        clearTimeout(timer);
        if (r instanceof Error) reject(r);
        else resolve(r);
      };
      this.#waiters.push(waiter);
    });
  }

  write(data: string | Buffer): void {
    this.#socket.write(typeof data === "string" ? Buffer.from(data, "latin1") : data);
  }

  /** Sends one command line (CRLF added) and returns its reply. */
  async command(line: string, timeoutMs?: number): Promise<SmtpReply> {
    this.write(`${line}\r\n`);
    return this.read(timeoutMs);
  }

  /** STARTTLS and the TLS handshake (any certificate accepted); returns the server certificate. */
  async starttls(servername?: string): Promise<tls.PeerCertificate> {
    const r = await this.command("STARTTLS");
    if (r.code !== 220) throw new Error(`STARTTLS refused: ${r.lines.join(" | ")}`);
    const plain = this.#socket;
    plain.removeAllListeners("data");
    plain.removeAllListeners("close");
    const secure = await new Promise<tls.TLSSocket>((resolve, reject) => {
      const s = tls.connect({
        socket: plain,
        rejectUnauthorized: false,
        ...(servername ? { servername } : {}),
      });
      s.once("secureConnect", () => resolve(s));
      s.once("error", reject);
    });
    this.#socket = secure;
    this.#attach(secure);
    return secure.getPeerCertificate();
  }

  /** Resolves once the server closed the connection (rejects after the timeout). */
  waitClosed(timeoutMs = this.#timeoutMs): Promise<void> {
    if (this.#closed) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`connection still open after ${timeoutMs} ms`)),
        timeoutMs,
      );
      this.#closedWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  close(): void {
    this.#socket.destroy();
  }
}
