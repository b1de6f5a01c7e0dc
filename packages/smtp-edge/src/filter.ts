// Content filtering before the end-of-DATA reply: the message goes to rspamd, and its answer decides
// the reply (reject 550 5.7.1, soft reject / greylist 451 4.7.1) or changes the message (X-Spam-*
// headers, a rewritten Subject, the header fields rspamd adds or removes). Built only when RSPAMD_URL
// is set: without it the edge does no filtering work at all.
import { type FilterAction, type FilterVerdict, replies, SmtpError } from "@mailpipe/contracts";
import type { Logger, Metrics } from "@mailpipe/telemetry";
import { headerBlock } from "./intake.ts";
import { RspamdClient, RspamdError, type RspamdRequest, type RspamdVerdict } from "./rspamd.ts";

export interface ContentFilterOptions {
  url: string;
  timeoutMs: number;
  /** tempfail (default): rspamd down or slow = 451 4.7.1; accept: take the message unfiltered */
  failMode: "tempfail" | "accept";
  /** messages bigger than this are not sent to rspamd (taken unfiltered, counted as skipped) */
  maxSize: number;
  password?: string | undefined;
  settingsId?: string | undefined;
  /**
   * mx: true, the verdict may change the message (X-Spam-* headers, Subject, milter headers).
   * msa: false, only reject / soft reject / greylist act: the message is DKIM-signed already, and
   * scores do not belong in mail that leaves.
   */
  modify: boolean;
}

export interface FilterInput extends Omit<RspamdRequest, "prepend" | "chunks" | "size"> {
  prepend: string | Buffer;
  chunks: readonly Buffer[];
  size: number;
  /** whether the message's own header has fields named like the ones we set (forged X-Spam-*) */
  hasSpamHeaders: boolean;
  smtputf8: boolean;
}

export interface FilterOutcome {
  verdict: FilterVerdict;
  prepend: string | Buffer;
  chunks: readonly Buffer[];
}

/**
 * The header fields we set on a filtered message, and `X-Spam` (rspamd's flag, which mda's Junk rule
 * reads too): the same names coming from outside are removed.
 */
export const SPAM_HEADERS = [
  "X-Spam-Flag",
  "X-Spam-Score",
  "X-Spam-Status",
  "X-Spam-Action",
  "X-Spam",
] as const;

const metricAction = (a: FilterAction) => a.replace(/ /g, "_");

/** rspamd's text for the client: one line of printable characters, at most 200 of them. */
export function sanitizeReplyText(text: string | undefined, fallback: string): string {
  const clean = (text ?? "")
    .replace(/[\r\n\t]+/g, " ")
    // biome-ignore lint/suspicious/noControlCharactersInRegex: removing them is the point
    .replace(/[\u0000-\u001f\u007f]/g, "")
    .replace(/\s+/g, " ")
    .trim()
    .slice(0, 200)
    .trim();
  return clean || fallback;
}

/** A header field name as RFC 5322 allows it (printable ASCII but colon), bounded. */
const FIELD_NAME = /^[\x21-\x39\x3b-\x7e]{1,76}$/;

/** A header value from rspamd as one field body: folded lines keep their leading space, nothing else breaks a line. */
function fieldValue(value: string): string {
  return value
    .split(/\r\n|\r|\n/)
    .map((l, i) => (i === 0 ? l.trim() : ` ${l.trim()}`))
    .filter((l, i) => i === 0 || l.trim() !== "")
    .join("\r\n")
    .slice(0, 4000);
}

/** RFC 2047 encoded words for a non-ASCII Subject, folded so no line gets long. */
function encodeSubject(subject: string): string {
  // biome-ignore lint/suspicious/noControlCharactersInRegex: ASCII range check
  if (/^[\x00-\x7f]*$/.test(subject)) return subject;
  const words: string[] = [];
  let part = "";
  for (const ch of subject) {
    if (Buffer.byteLength(part + ch) > 45) {
      words.push(part);
      part = "";
    }
    part += ch;
  }
  if (part) words.push(part);
  return words.map((w) => `=?UTF-8?B?${Buffer.from(w).toString("base64")}?=`).join("\r\n ");
}

interface RawField {
  name: string;
  /** the whole field with its CRLF, as bytes in latin1 (so 8-bit bytes go through unchanged) */
  raw: string;
}

function splitFields(block: string): RawField[] {
  const out: RawField[] = [];
  for (const line of block.split(/(?<=\r\n)/)) {
    if (line === "" || line === "\r\n") continue;
    if ((line[0] === " " || line[0] === "\t") && out.length) {
      out[out.length - 1]!.raw += line;
      continue;
    }
    const colon = line.indexOf(":");
    out.push({ name: colon > 0 ? line.slice(0, colon).trim().toLowerCase() : "", raw: line });
  }
  return out;
}

function removeFields<F extends RawField>(fields: F[], name: string, index: number): F[] {
  const lower = name.toLowerCase();
  const positions = fields.flatMap((f, i) => (f.name === lower ? [i] : []));
  let drop: number[];
  if (index === 0) drop = positions;
  else if (index > 0) drop = positions[index - 1] === undefined ? [] : [positions[index - 1]!];
  else drop = positions[positions.length + index] === undefined ? [] : [positions[positions.length + index]!];
  return fields.filter((_, i) => !drop.includes(i));
}

/**
 * The message with the verdict applied: the header (our prepended fields and the message's own) is
 * rewritten only when a field must go or the Subject changes; otherwise the new fields are only
 * prepended and the message's bytes are not touched.
 */
export function applyVerdict(
  input: Pick<FilterInput, "prepend" | "chunks" | "hasSpamHeaders">,
  v: RspamdVerdict | undefined,
  ours: string[],
): { prepend: string | Buffer; chunks: readonly Buffer[] } {
  const added = [
    ...(v?.addHeaders ?? [])
      .filter((h) => FIELD_NAME.test(h.name))
      .map((h) => `${h.name}: ${fieldValue(h.value)}\r\n`),
    ...ours,
  ].join("");
  const removals = [
    ...(v?.removeHeaders ?? []).filter((r) => FIELD_NAME.test(r.name)),
    ...(input.hasSpamHeaders ? SPAM_HEADERS.map((name) => ({ name, index: 0 })) : []),
  ];
  const subject = v?.action === "rewrite subject" ? v.subject : undefined;
  if (removals.length === 0 && subject === undefined) {
    if (!added) return { prepend: input.prepend, chunks: input.chunks };
    return {
      prepend:
        typeof input.prepend === "string"
          ? input.prepend + added
          : Buffer.concat([input.prepend, Buffer.from(added)]),
      chunks: input.chunks,
    };
  }
  // rewrite: the header block of the message (copied once), our fields before it, the body untouched
  const block = headerBlock(input.chunks) ?? Buffer.alloc(0);
  const prepend = typeof input.prepend === "string" ? Buffer.from(input.prepend) : input.prepend;
  const ourFields = splitFields(prepend.toString("latin1")).map((f) => ({ ...f, ours: true }));
  let fields = [...ourFields, ...splitFields(block.toString("latin1")).map((f) => ({ ...f, ours: false }))];
  for (const r of removals) fields = removeFields(fields, r.name, r.index);
  if (subject !== undefined) {
    const value = encodeSubject(sanitizeReplyText(subject, "").slice(0, 900));
    const field = {
      name: "subject",
      raw: Buffer.from(`Subject: ${value}\r\n`).toString("latin1"),
      ours: false,
    };
    const at = fields.findIndex((f) => f.name === "subject");
    fields = at >= 0 ? fields.map((f, i) => (i === at ? field : f)) : [...fields, field];
    fields = fields.filter((f, i) => f.name !== "subject" || i === (at >= 0 ? at : fields.length - 1));
  }
  // ours (Received, Authentication-Results…) first, then what the filter adds, then the message's own
  const header = Buffer.from(
    fields
      .filter((f) => f.ours)
      .map((f) => f.raw)
      .join("") +
      Buffer.from(added).toString("latin1") +
      fields
        .filter((f) => !f.ours)
        .map((f) => f.raw)
        .join(""),
    "latin1",
  );
  return { prepend: header, chunks: bodyAfter(input.chunks, block.length) };
}

/** The chunks after the first `offset` bytes (views, not copies). */
function bodyAfter(chunks: readonly Buffer[], offset: number): Buffer[] {
  const out: Buffer[] = [];
  let skip = offset;
  for (const c of chunks) {
    if (skip >= c.length) {
      skip -= c.length;
      continue;
    }
    out.push(skip > 0 ? c.subarray(skip) : c);
    skip = 0;
  }
  return out;
}

/** X-Spam-* fields for a verdict (mx): the score on every filtered message, the flag on spam. */
export function spamHeaders(v: RspamdVerdict): string[] {
  const spam = v.action === "add header" || v.action === "rewrite subject";
  const score = v.score.toFixed(2);
  return [
    ...(spam ? ["X-Spam-Flag: YES\r\n"] : []),
    `X-Spam-Score: ${score}\r\n`,
    `X-Spam-Status: ${spam ? "Yes" : "No"}, score=${score} required=${v.required.toFixed(2)}\r\n`,
    `X-Spam-Action: ${v.customAction ?? v.action}\r\n`,
  ];
}

export interface ContentFilterDeps {
  log: Logger;
  metrics: Metrics;
}

/** The filter one SMTP edge process uses (msa's two listeners share one). */
export class ContentFilter {
  readonly options: ContentFilterOptions;
  readonly client: RspamdClient;
  readonly #log: Logger;
  readonly #checks;
  readonly #failures;
  readonly #seconds;

  constructor(options: ContentFilterOptions, { log, metrics }: ContentFilterDeps) {
    this.options = options;
    this.client = new RspamdClient(options);
    this.#log = log;
    this.#checks = metrics.counter(
      "filter_checks_total",
      "Messages looked at by the content filter (rspamd), by its action; skipped = over FILTER_MAX_SIZE, failed = no usable answer",
      ["action"],
    );
    this.#failures = metrics.counter(
      "filter_failures_total",
      "Content filter checks that got no usable answer, by reason",
      ["reason"],
    );
    this.#seconds = metrics.histogram(
      "filter_check_seconds",
      "Time rspamd took to answer",
      [],
      [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    );
  }

  close(): void {
    this.client.close();
  }

  /**
   * Checks a message and applies the verdict: resolves with the message to store (and the verdict
   * for the `filtered` event), or throws SmtpError with the reply to give.
   */
  async check(input: FilterInput, signal?: AbortSignal): Promise<FilterOutcome> {
    const { options } = this;
    if (input.size > options.maxSize) {
      this.#checks.inc({ action: "skipped" });
      this.#log.info(
        { size: input.size, max: options.maxSize },
        "message over FILTER_MAX_SIZE: not filtered",
      );
      return { verdict: { action: "skipped" }, ...this.#unfiltered(input) };
    }
    const prepend = typeof input.prepend === "string" ? Buffer.from(input.prepend) : input.prepend;
    const started = performance.now();
    let v: RspamdVerdict;
    try {
      v = await this.client.check({ ...input, prepend }, signal);
    } catch (err) {
      const e =
        err instanceof RspamdError ? err : new RspamdError("unavailable", String(err), { cause: err });
      if (signal?.aborted) throw err;
      this.#failures.inc({ reason: e.reason });
      this.#checks.inc({ action: "failed" });
      if (options.failMode === "accept") {
        this.#log.warn(
          { reason: e.reason, err: e.message },
          "content filter failed; FILTER_FAIL_MODE=accept takes the message unfiltered",
        );
        return { verdict: { action: "failed" }, ...this.#unfiltered(input) };
      }
      this.#log.warn(
        { reason: e.reason, err: e.message },
        "content filter failed; answering 451 4.7.1 (the client will retry; check rspamd at RSPAMD_URL)",
      );
      throw Object.assign(new SmtpError(replies.filterUnavailable(), { cause: e }), {
        verdict: { action: "failed" } satisfies FilterVerdict,
      });
    } finally {
      this.#seconds.observe((performance.now() - started) / 1000);
    }
    const verdict: FilterVerdict = {
      action: v.action,
      score: v.score,
      required: v.required,
      ...(v.symbols.length ? { symbols: v.symbols } : {}),
    };
    this.#checks.inc({ action: metricAction(v.action) });
    this.#log.info(
      {
        action: v.customAction ?? v.action,
        score: v.score,
        required: v.required,
        symbols: v.symbols.slice(0, 5),
      },
      "content filter verdict",
    );
    if (v.action === "reject") {
      const text = sanitizeReplyText(v.smtpMessage, "Message rejected as spam");
      throw Object.assign(new SmtpError(replies.contentRejected(text)), { verdict });
    }
    if (v.action === "soft reject" || v.action === "greylist") {
      const text = sanitizeReplyText(v.smtpMessage, "Try again later");
      throw Object.assign(new SmtpError(replies.contentDeferred(text)), { verdict });
    }
    if (!options.modify) return { verdict, prepend: input.prepend, chunks: input.chunks };
    return { verdict, ...applyVerdict(input, v, spamHeaders(v)) };
  }

  #unfiltered(input: FilterInput) {
    // forged X-Spam-* fields never pass, filtered or not
    return this.options.modify
      ? applyVerdict(input, undefined, [])
      : { prepend: input.prepend, chunks: input.chunks };
  }
}

/** The verdict a refusal from `check` carries, for the `filtered` event. */
export function verdictOf(err: unknown): FilterVerdict | undefined {
  return (err as { verdict?: FilterVerdict } | undefined)?.verdict;
}
