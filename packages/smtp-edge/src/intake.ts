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
  | { ok: false; reason: "too-big"; size: number };

interface SizedStream extends Readable {
  sizeExceeded?: boolean;
  byteLength?: number;
}

/**
 * Reads a DATA stream to its end. Never holds more than `maxBytes` (counted after normalisation):
 * once the message is over the limit (or smtp-server flagged `sizeExceeded`) the rest is read and
 * dropped, because SMTP answers only after the final dot.
 */
export async function readMessage(
  stream: Readable,
  { maxBytes }: { maxBytes: number },
): Promise<IntakeResult> {
  const normalizer = new LineEndingNormalizer();
  const s = stream as SizedStream;
  let chunks: Buffer[] = [];
  let size = 0;
  let tooBig = false;
  const keep = (buf: Buffer) => {
    if (tooBig || buf.length === 0) return;
    size += buf.length;
    if (size > maxBytes || s.sizeExceeded) {
      tooBig = true;
      chunks = [];
      return;
    }
    chunks.push(buf);
  };
  for await (const chunk of stream) keep(normalizer.push(chunk as Buffer));
  keep(normalizer.end());
  if (tooBig || s.sizeExceeded)
    return { ok: false, reason: "too-big", size: Math.max(size, s.byteLength ?? 0) };
  const headers = parseHeaderBlock(headerBlock(chunks));
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

/** The bytes before the first empty line (the whole message when it has no body). */
export function headerBlock(chunks: readonly Buffer[]): Buffer {
  const first = chunks[0];
  if (!first) return Buffer.alloc(0);
  // a message that starts with an empty line has no header fields
  if (first[0] === CR && first[1] === LF) return Buffer.alloc(0);
  let head: Buffer = Buffer.alloc(0);
  for (const chunk of chunks) {
    const from = Math.max(0, head.length - 3);
    head = head.length === 0 ? chunk : Buffer.concat([head, chunk]);
    const at = head.indexOf(HEADER_END, from);
    if (at >= 0) return head.subarray(0, at + 2);
  }
  return head;
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
