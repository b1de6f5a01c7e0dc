import type { Readable } from "node:stream";

const CR = 0x0d;
const LF = 0x0a;
const CRLF = Buffer.from("\r\n");
const HEADER_END = Buffer.from("\r\n\r\n");

/**
 * Line-ending policy: **normalised**. Every bare LF and bare CR in a message becomes CRLF before the
 * message is stored, so no later hop (our own SMTP client, a remote MTA, Dovecot) can read a bare
 * line ending as a line break we did not see ("SMTP smuggling", CVE-2023-51764..6). smtp-server
 * already ends DATA only on CRLF.CRLF; normalising makes the stored bytes unambiguous too.
 * Streaming: a CR at the end of one chunk is held until the next chunk shows whether LF follows.
 */
export class LineEndingNormalizer {
  #pendingCr = false;

  push(chunk: Buffer): Buffer {
    if (chunk.length === 0) return chunk;
    const parts: Buffer[] = [];
    let start = 0;
    let i = 0;
    if (this.#pendingCr) {
      this.#pendingCr = false;
      parts.push(CRLF);
      if (chunk[0] === LF) {
        i = 1;
        start = 1;
      }
    }
    const len = chunk.length;
    while (i < len) {
      const cr = chunk.indexOf(CR, i);
      const lf = chunk.indexOf(LF, i);
      if (cr < 0 && lf < 0) break;
      if (cr >= 0 && (lf < 0 || cr < lf)) {
        if (cr + 1 === len) {
          parts.push(chunk.subarray(start, cr));
          start = len;
          this.#pendingCr = true;
          break;
        }
        if (chunk[cr + 1] === LF) {
          i = cr + 2;
          continue;
        }
        parts.push(chunk.subarray(start, cr), CRLF); // bare CR
        start = i = cr + 1;
      } else {
        parts.push(chunk.subarray(start, lf), CRLF); // bare LF
        start = i = lf + 1;
      }
    }
    if (start === 0 && parts.length === 0) return chunk;
    if (start < len) parts.push(chunk.subarray(start));
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }

  /** What is still held back at the end of the message. */
  end(): Buffer {
    if (!this.#pendingCr) return Buffer.alloc(0);
    this.#pendingCr = false;
    return CRLF;
  }
}

export interface HeaderField {
  /** as written (case kept) */
  name: string;
  /** unfolded, trimmed */
  value: string;
}

/** A message read from DATA: bytes normalised to CRLF, and its header block parsed. */
export interface IncomingMessage {
  /** the message bytes, in order, line endings normalised */
  chunks: Buffer[];
  size: number;
  headers: HeaderField[];
  /** the values of every header field with this name (case-insensitive), in order */
  header(name: string): string[];
  /** the Message-ID header value (with its angle brackets), when there is one */
  messageId: string | undefined;
  /** number of Received header fields, for loop detection */
  receivedCount: number;
}

export type IntakeResult =
  | { ok: true; message: IncomingMessage }
  | {
      ok: false;
      /** over maxBytes; the header block over maxHeaderBytes; or the edge's memory budget ran out */
      reason: "too-big" | "header-too-big" | "no-memory";
      size: number;
    };

/** The header block a message may have (RFC 5322 sets no limit; 1 MiB is far beyond any real one). */
export const MAX_HEADER_BYTES = 1024 * 1024;

/** Memory a transaction holds, counted against the edge-wide budget (see memory-budget.ts). */
export interface ByteLease {
  /** false when the bytes do not fit: they are not taken */
  take(bytes: number): boolean;
  /** gives back everything taken; harmless to call again */
  release(): void;
}

interface SizedStream extends Readable {
  sizeExceeded?: boolean;
  byteLength?: number;
}

/**
 * Reads a DATA stream to its end. Never holds more than `maxBytes` (counted after normalisation):
 * once the message is over the limit (or smtp-server flagged `sizeExceeded`) the rest is read and
 * dropped, because SMTP answers only after the final dot. With a `lease`, every byte kept is taken
 * from it first; when one does not fit, what was held is released and the rest is dropped the same
 * way (`no-memory`). The caller releases the lease once the transaction is over.
 */
export async function readMessage(
  stream: Readable,
  {
    maxBytes,
    maxHeaderBytes = MAX_HEADER_BYTES,
    lease,
  }: { maxBytes: number; maxHeaderBytes?: number; lease?: ByteLease },
): Promise<IntakeResult> {
  const normalizer = new LineEndingNormalizer();
  const s = stream as SizedStream;
  let chunks: Buffer[] = [];
  let size = 0;
  let refused: "too-big" | "no-memory" | undefined;
  const drop = (reason: "too-big" | "no-memory") => {
    refused = reason;
    chunks = [];
    lease?.release();
  };
  const keep = (buf: Buffer) => {
    if (refused === "too-big" || buf.length === 0) return;
    size += buf.length;
    if (size > maxBytes || s.sizeExceeded) return drop("too-big");
    if (refused) return;
    if (lease && !lease.take(buf.length)) return drop("no-memory");
    chunks.push(buf);
  };
  for await (const chunk of stream) keep(normalizer.push(chunk as Buffer));
  keep(normalizer.end());
  if (refused === "too-big" || s.sizeExceeded)
    return { ok: false, reason: "too-big", size: Math.max(size, s.byteLength ?? 0) };
  if (refused) return { ok: false, reason: refused, size };
  const block = headerBlock(chunks, maxHeaderBytes);
  if (!block) return { ok: false, reason: "header-too-big", size };
  const headers = parseHeaderBlock(block);
  const header = (name: string) => {
    const lower = name.toLowerCase();
    return headers.filter((h) => h.name.toLowerCase() === lower).map((h) => h.value);
  };
  const messageId = header("message-id")[0]?.slice(0, 998) || undefined;
  return {
    ok: true,
    message: {
      chunks,
      size,
      headers,
      header,
      messageId,
      receivedCount: header("received").length,
    },
  };
}

/**
 * The bytes before the first empty line (the whole message when it has no body), or `undefined`
 * when they are more than `maxBytes`. Linear: each chunk is searched once, plus the few bytes that
 * straddle its boundary with the one before; the chunks are copied once, and none past `maxBytes`
 * is looked at.
 */
export function headerBlock(
  chunks: readonly Buffer[],
  maxBytes = Number.POSITIVE_INFINITY,
): Buffer | undefined {
  // the CRLF that ends the (virtual) line before the message: a message that starts with an empty
  // line has no header fields
  let tail: Buffer = CRLF;
  let before = 0; // bytes in the chunks already searched
  let end: number | undefined; // where the CRLFCRLF starts (-2: the message starts with CRLF)
  let used = 0; // chunks that hold part of the block
  for (const chunk of chunks) {
    used++;
    const seam = Buffer.concat([tail, chunk.subarray(0, HEADER_END.length - 1)]);
    const inSeam = seam.indexOf(HEADER_END);
    if (inSeam >= 0) {
      end = before - tail.length + inSeam;
      break;
    }
    const inChunk = chunk.indexOf(HEADER_END);
    if (inChunk >= 0) {
      end = before + inChunk;
      break;
    }
    before += chunk.length;
    if (before > maxBytes) return undefined;
    const keep = HEADER_END.length - 1;
    tail = chunk.length >= keep ? chunk.subarray(-keep) : Buffer.concat([tail, chunk]).subarray(-keep);
  }
  const length = end === undefined ? before : end + 2;
  if (length > maxBytes) return undefined;
  if (length <= 0) return Buffer.alloc(0);
  return Buffer.concat(chunks.slice(0, used), length);
}

/** Header fields of a CRLF header block, unfolded; lines that are not fields are skipped. */
export function parseHeaderBlock(block: Buffer): HeaderField[] {
  const out: HeaderField[] = [];
  let current: { name: string; value: string } | undefined;
  for (const line of block.toString("utf8").split("\r\n")) {
    if (line === "") continue;
    if ((line[0] === " " || line[0] === "\t") && current) {
      current.value += line;
      continue;
    }
    const colon = line.indexOf(":");
    if (colon <= 0 || /[\s]/.test(line.slice(0, colon).trimEnd())) {
      current = undefined;
      continue;
    }
    current = { name: line.slice(0, colon).trimEnd(), value: line.slice(colon + 1) };
    out.push(current);
  }
  return out.map((h) => ({ name: h.name, value: h.value.trim() }));
}
