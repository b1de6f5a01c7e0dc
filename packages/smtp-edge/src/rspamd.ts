// rspamd's HTTP protocol (/checkv2): the request with the envelope and the client in headers and the
// message as the body, streamed from the chunks the edge holds (never joined into one buffer), and
// the JSON answer read into a verdict. https://rspamd.com/doc/developers/protocol.html
import http from "node:http";
import https from "node:https";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { z } from "zod";

export type RspamdAction =
  | "no action"
  | "greylist"
  | "add header"
  | "rewrite subject"
  | "soft reject"
  | "reject";

const ACTIONS: readonly string[] = [
  "no action",
  "greylist",
  "add header",
  "rewrite subject",
  "soft reject",
  "reject",
];

export interface RspamdRequest {
  queueId: string;
  /** "" for the null sender */
  mailFrom: string;
  recipients: readonly string[];
  ip: string;
  helo: string;
  /** the client's reverse DNS name, when known */
  hostname?: string | undefined;
  /** the authenticated user (msa) */
  user?: string | undefined;
  tls?: { protocol: string; cipher: string } | undefined;
  /** our name (MTA-Name: rspamd's Authentication-Results authserv-id) */
  mtaName: string;
  /** header fields we put before the message, then the message */
  prepend: Buffer;
  chunks: readonly Buffer[];
  size: number;
}

export interface RspamdClientOptions {
  /** the normal worker, e.g. http://rspamd:11333 (or the controller, with `password`) */
  url: string;
  timeoutMs: number;
  password?: string | undefined;
  settingsId?: string | undefined;
}

export interface MilterAdd {
  name: string;
  value: string;
  order: number;
}

export interface RspamdVerdict {
  action: RspamdAction;
  /** the action as rspamd named it, when it is not one of the six (a custom action) */
  customAction?: string;
  score: number;
  required: number;
  /** messages.smtp_message: the text rspamd wants the client to see */
  smtpMessage?: string;
  /** `rewrite subject`: the new subject */
  subject?: string;
  addHeaders: MilterAdd[];
  /** header name → which one: 0 every one, n the n-th, -n the n-th from the end */
  removeHeaders: { name: string; index: number }[];
  /** symbol names, highest score first (at most 20) */
  symbols: string[];
}

export type RspamdFailure = "timeout" | "unavailable" | "bad_response";

export class RspamdError extends Error {
  override name = "RspamdError";
  readonly reason: RspamdFailure;
  constructor(reason: RspamdFailure, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.reason = reason;
  }
}

const AddValue = z.union([z.string(), z.object({ value: z.string(), order: z.number().optional() }).loose()]);

const Answer = z
  .object({
    action: z.string(),
    score: z.number().optional(),
    required_score: z.number().optional(),
    subject: z.string().optional(),
    messages: z.record(z.string(), z.unknown()).optional(),
    symbols: z.record(z.string(), z.object({ score: z.number().optional() }).loose()).optional(),
    milter: z
      .object({
        add_headers: z.record(z.string(), z.union([AddValue, z.array(AddValue)])).optional(),
        remove_headers: z.record(z.string(), z.number()).optional(),
      })
      .loose()
      .optional(),
  })
  .loose();

/** Header values must be latin1 for node's HTTP client: UTF-8 addresses go as their bytes. */
const wire = (s: string) => Buffer.from(s.replace(/[\r\n]/g, " "), "utf8").toString("latin1");

const MAX_ANSWER = 4 * 1024 * 1024;

/** One client per process. */
export class RspamdClient {
  readonly url: URL;
  readonly #options: RspamdClientOptions;
  readonly #agent: http.Agent;

  constructor(options: RspamdClientOptions) {
    const base = new URL(options.url);
    if (base.protocol !== "http:" && base.protocol !== "https:")
      throw new Error(`RSPAMD_URL must be an http:// or https:// URL, not ${base.protocol}`);
    this.url = new URL(base.pathname.replace(/\/?$/, "/checkv2"), base);
    this.#options = options;
    // rspamd closes the connection after every answer (Connection: close): nothing to keep alive
    this.#agent = base.protocol === "https:" ? new https.Agent() : new http.Agent();
  }

  close(): void {
    this.#agent.destroy();
  }

  /** Sends the message; resolves with rspamd's verdict or throws RspamdError. */
  async check(r: RspamdRequest, signal?: AbortSignal): Promise<RspamdVerdict> {
    const headers: http.OutgoingHttpHeaders = {
      "Content-Length": r.prepend.length + r.size,
      "Queue-Id": r.queueId,
      From: wire(r.mailFrom),
      IP: r.ip,
      "MTA-Name": wire(r.mtaName),
    };
    if (r.recipients.length) headers.Rcpt = r.recipients.map(wire);
    if (r.helo) headers.Helo = wire(r.helo);
    if (r.hostname) headers.Hostname = wire(r.hostname);
    if (r.user) headers.User = wire(r.user);
    if (r.tls) {
      headers["TLS-Version"] = wire(r.tls.protocol);
      headers["TLS-Cipher"] = wire(r.tls.cipher);
    }
    if (this.#options.settingsId) headers["Settings-ID"] = wire(this.#options.settingsId);
    if (this.#options.password) headers.Password = wire(this.#options.password);

    const timeout = AbortSignal.timeout(this.#options.timeoutMs);
    const all = signal ? AbortSignal.any([timeout, signal]) : timeout;
    const failure = (err: unknown): RspamdError => {
      if (err instanceof RspamdError) return err;
      if (timeout.aborted)
        return new RspamdError("timeout", `rspamd did not answer within ${this.#options.timeoutMs} ms`, {
          cause: err,
        });
      return new RspamdError("unavailable", `rspamd at ${this.url.host}: ${(err as Error).message}`, {
        cause: err,
      });
    };
    const mod = this.url.protocol === "https:" ? https : http;
    try {
      const req = mod.request(this.url, { method: "POST", headers, agent: this.#agent, signal: all });
      const response = new Promise<http.IncomingMessage>((resolve, reject) => {
        req.once("response", resolve);
        req.once("error", reject);
      });
      // the request's own errors surface through `response`
      pipeline(Readable.from([r.prepend, ...r.chunks], { objectMode: false }), req).catch(() => {});
      const res = await response;
      const body: Buffer[] = [];
      let length = 0;
      for await (const chunk of res) {
        length += (chunk as Buffer).length;
        if (length > MAX_ANSWER) throw new RspamdError("bad_response", "rspamd's answer is over 4 MiB");
        body.push(chunk as Buffer);
      }
      const text = Buffer.concat(body).toString("utf8");
      if (res.statusCode !== 200)
        throw new RspamdError(
          "bad_response",
          `rspamd answered HTTP ${res.statusCode}: ${text.replace(/\s+/g, " ").slice(0, 200)}`,
        );
      return parseAnswer(text);
    } catch (err) {
      throw failure(err);
    }
  }
}

/** rspamd's JSON answer as a verdict; throws RspamdError("bad_response") when it is not one. */
export function parseAnswer(text: string): RspamdVerdict {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new RspamdError("bad_response", "rspamd's answer is not JSON");
  }
  const parsed = Answer.safeParse(json);
  if (!parsed.success) throw new RspamdError("bad_response", "rspamd's answer has no action");
  const a = parsed.data;
  const known = ACTIONS.includes(a.action);
  const smtp = a.messages?.["smtp_message"];
  const addHeaders: MilterAdd[] = [];
  for (const [name, v] of Object.entries(a.milter?.add_headers ?? {})) {
    for (const one of Array.isArray(v) ? v : [v]) {
      if (typeof one === "string") addHeaders.push({ name, value: one, order: 0 });
      else addHeaders.push({ name, value: one.value, order: one.order ?? 0 });
    }
  }
  const symbols = Object.entries(a.symbols ?? {})
    .sort(([, x], [, y]) => Math.abs(y.score ?? 0) - Math.abs(x.score ?? 0))
    .slice(0, 20)
    .map(([name]) => name.slice(0, 128));
  return {
    // a custom action is kept in the message and marked, never dropped nor refused
    action: known ? (a.action as RspamdAction) : "add header",
    ...(known ? {} : { customAction: a.action.slice(0, 64) }),
    score: Number.isFinite(a.score) ? a.score! : 0,
    required: Number.isFinite(a.required_score) ? a.required_score! : 0,
    ...(typeof smtp === "string" && smtp ? { smtpMessage: smtp } : {}),
    ...(a.subject !== undefined ? { subject: a.subject } : {}),
    addHeaders: addHeaders.sort((x, y) => x.order - y.order),
    removeHeaders: Object.entries(a.milter?.remove_headers ?? {}).map(([name, index]) => ({
      name,
      index: Math.trunc(index),
    })),
    symbols,
  };
}
