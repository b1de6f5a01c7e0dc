// Delivery status notifications (RFC 3464 in an RFC 6522 multipart/report), built by hand: three
// fixed parts, every line CRLF-terminated and at most 998 octets (RFC 5322 2.1.1).
import type { Readable } from "node:stream";
import { type BodyRef, formatReply, isTemporary, type Reply } from "@mailpipe/contracts";

export type DsnKind = "failure" | "delay" | "success";
export type DsnAction = "failed" | "delayed" | "delivered" | "relayed";

export interface DsnRecipient {
  /** the address delivery was attempted to */
  finalRecipient: string;
  /** the address the sender used, when different (alias, ORCPT) */
  originalRecipient?: string;
  action: DsnAction;
  /** RFC 3463 status, e.g. 5.1.1 */
  status: string;
  /** the host that gave the reply, when one did */
  remoteMta?: string;
  /** the reply the recipient failed (or is waiting) with */
  diagnostic?: Reply;
  lastAttemptDate?: Date;
  /** delay notices: when the system gives up */
  willRetryUntil?: Date;
}

export interface DsnInput {
  kind: DsnKind;
  /** MAIL_HOSTNAME: the Reporting-MTA and the MAILER-DAEMON domain */
  reportingMta: string;
  /** the original envelope sender, who receives the report */
  to: string;
  /** the queue id of the message reported on */
  queueId: string;
  /** RFC 3461 ENVID the sender gave (decoded) */
  envid?: string;
  arrivalDate: Date;
  recipients: readonly DsnRecipient[];
  /** the original message's header block, as stored */
  headers?: Buffer;
  /** the whole original message (RET=FULL): returned as message/rfc822 instead of the headers */
  message?: Buffer;
  /** this report's date and Message-ID (without < >) */
  date: Date;
  messageId: string;
}

export interface BuiltDsn {
  raw: Buffer;
  /** whether any part carries 8-bit data (the original headers may) */
  eightBit: boolean;
  /** whether an address is non-ASCII (needs SMTPUTF8) */
  utf8Address: boolean;
}

const CRLF = "\r\n";
const MAX_LINE = 998;
const FOLD_AT = 78;

const DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/** RFC 5322 date-time in UTC: "Tue, 4 Mar 2025 09:05:00 +0000". */
export function rfc5322Date(d: Date): string {
  const p = (n: number) => String(n).padStart(2, "0");
  return (
    `${DAYS[d.getUTCDay()]}, ${d.getUTCDate()} ${MONTHS[d.getUTCMonth()]} ${d.getUTCFullYear()} ` +
    `${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())} +0000`
  );
}

/**
 * The Status to report: the reply's own code, except an expiry after temporary failures (4.4.7);
 * a success is 2.x.x whatever the reply said.
 */
export function dsnStatus(action: DsnAction, reply: Reply | undefined): string {
  if (action === "delivered" || action === "relayed") {
    return reply?.enhanced.startsWith("2.") ? reply.enhanced : "2.0.0";
  }
  if (!reply) return action === "failed" ? "5.0.0" : "4.0.0";
  if (action === "failed" && isTemporary(reply)) return "4.4.7";
  return reply.enhanced;
}

const SUBJECTS: Record<DsnKind, string> = {
  failure: "Undelivered Mail Returned to Sender",
  delay: "Delayed Mail (still being retried)",
  success: "Successful Mail Delivery Report",
};

function isAscii(text: string): boolean {
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) > 0x7f) return false;
  return true;
}

/** 7-bit text for the delivery-status part: non-ASCII as RFC 6533 \x{HHHH}, controls dropped. */
function ascii(text: string): string {
  let out = "";
  for (const ch of text) {
    const cp = ch.codePointAt(0)!;
    if (cp >= 0x20 && cp < 0x7f) out += ch;
    else if (cp === 0x09) out += " ";
    else if (cp >= 0x80) out += `\\x{${cp.toString(16).toUpperCase()}}`;
  }
  return out;
}

/**
 * One header-style field, folded at spaces near 78 columns; a word too long for a line is split
 * hard so no line passes 998 octets.
 */
export function foldField(name: string, value: string): string {
  const words = value.split(" ");
  const lines: string[] = [];
  let line = `${name}:`;
  for (const word of words) {
    let w = word;
    while (w.length > MAX_LINE - 2) {
      if (line.trim() !== "") lines.push(line);
      lines.push(` ${w.slice(0, MAX_LINE - 2)}`);
      w = w.slice(MAX_LINE - 2);
      line = "";
    }
    if (line === "") line = ` ${w}`;
    else if (line.length + 1 + w.length > FOLD_AT && line.trim().length > name.length + 1) {
      lines.push(line);
      line = ` ${w}`;
    } else line += ` ${w}`;
  }
  if (line !== "") lines.push(line);
  return lines.join(CRLF);
}

/** Plain text wrapped at 76 columns (words longer than that are split). */
function wrap(text: string, width = 76): string[] {
  const out: string[] = [];
  for (const para of text.split("\n")) {
    let line = "";
    for (const word of para.split(" ")) {
      let w = word;
      while (w.length > width) {
        if (line) out.push(line);
        out.push(w.slice(0, width));
        w = w.slice(width);
        line = "";
      }
      if (!line) line = w;
      else if (line.length + 1 + w.length > width) {
        out.push(line);
        line = w;
      } else line += ` ${w}`;
    }
    out.push(line);
  }
  return out;
}

function base64Lines(data: Buffer): string {
  const b64 = data.toString("base64");
  const lines: string[] = [];
  for (let i = 0; i < b64.length; i += 76) lines.push(b64.slice(i, i + 76));
  return lines.join(CRLF);
}

/** Header lines as stored, with CRLF endings and no line over 998 octets. */
function normaliseHeaders(headers: Buffer): { text: Buffer; eightBit: boolean } {
  const lines = headers
    .toString("latin1") // byte-preserving: 8-bit headers pass through untouched
    .replace(/\r?\n$/, "")
    .split(/\r?\n/);
  const out: string[] = [];
  for (const line of lines) {
    if (line === "") continue;
    for (let i = 0; i < line.length; i += MAX_LINE) {
      const piece = line.slice(i, i + MAX_LINE);
      out.push(i === 0 ? piece : ` ${piece.slice(0, MAX_LINE - 1)}`);
    }
  }
  const text = Buffer.from(out.join(CRLF) + CRLF, "latin1");
  return { text, eightBit: text.some((b) => b >= 0x80) };
}

/** The whole message with CRLF line endings (as stored it already has them; bare LF is mended). */
function normaliseMessage(message: Buffer): { text: Buffer; eightBit: boolean } {
  let text = message.toString("latin1").replace(/\r?\n/g, CRLF);
  if (!text.endsWith(CRLF)) text += CRLF;
  const buf = Buffer.from(text, "latin1");
  return { text: buf, eightBit: buf.some((b) => b >= 0x80) };
}

function humanText(input: DsnInput): string {
  const intro =
    input.kind === "failure"
      ? "Your message could not be delivered to one or more recipients. " +
        "It has been returned with this report; the recipients and the reasons are below."
      : input.kind === "success"
        ? "You asked to be told when your message was delivered (NOTIFY=SUCCESS): it was, to the " +
          'recipients below. "delivered" means it is in the mailbox. "relayed" means it went on to ' +
          "a mail system that does not report deliveries: this is the last notice you get from us, " +
          "and that system may still report an error."
        : "THIS IS A WARNING ONLY: you do not need to send your message again. " +
          "It could not be delivered yet to the recipients below; delivery will be retried" +
          (input.recipients[0]?.willRetryUntil
            ? ` until ${rfc5322Date(input.recipients[0].willRetryUntil)}.`
            : ".");
  const lines = [
    `This is the mail system at ${input.reportingMta}.`,
    "",
    intro,
    "",
    `Queue ID: ${input.queueId}`,
    `Arrived: ${rfc5322Date(input.arrivalDate)}`,
    "",
  ];
  for (const r of input.recipients) {
    const who = r.originalRecipient
      ? `<${r.finalRecipient}> (sent to <${r.originalRecipient}>)`
      : `<${r.finalRecipient}>`;
    const why = r.diagnostic ? formatReply(r.diagnostic) : `status ${r.status}`;
    const where = r.remoteMta ? ` (from ${r.remoteMta})` : "";
    lines.push(input.kind === "success" ? `${who}: ${r.action}${where}` : `${who}: ${why}${where}`);
  }
  lines.push("");
  return lines.join("\n");
}

/** Builds the report. Pure: the caller stores it and queues it. */
export function buildDsn(input: DsnInput): BuiltDsn {
  const boundary = `=_mailpipe-report-${input.messageId.replace(/[^A-Za-z0-9]/g, "")}`;
  const utf8Address = !isAscii(input.to);
  const subject = SUBJECTS[input.kind];
  const returned = input.kind === "success" ? "Delivered Message" : "Undelivered Message";

  const head = [
    foldField("From", `Mail Delivery System <MAILER-DAEMON@${input.reportingMta}>`),
    foldField("To", `<${input.to}>`),
    foldField("Subject", subject),
    foldField("Date", rfc5322Date(input.date)),
    foldField("Message-ID", `<${input.messageId}>`),
    "MIME-Version: 1.0",
    "Auto-Submitted: auto-replied",
    foldField("Content-Type", `multipart/report; report-type=delivery-status; boundary="${boundary}"`),
  ].join(CRLF);

  // part 1: for people
  const text = humanText(input);
  const textIsAscii = isAscii(text);
  const part1 = textIsAscii
    ? [
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "Content-Transfer-Encoding: 7bit",
        "",
        wrap(text).join(CRLF),
      ].join(CRLF)
    : [
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "Content-Transfer-Encoding: base64",
        "",
        base64Lines(Buffer.from(wrap(text).join(CRLF), "utf8")),
      ].join(CRLF);

  // part 2: for programs
  const perMessage = [
    // RFC 3464 2.2.1: the sender's ENVID, decoded (it is printable ASCII, checked at MAIL)
    ...(input.envid ? [foldField("Original-Envelope-Id", ascii(input.envid))] : []),
    foldField("Reporting-MTA", `dns; ${input.reportingMta}`),
    foldField("X-Mailpipe-Queue-ID", input.queueId),
    foldField("Arrival-Date", rfc5322Date(input.arrivalDate)),
  ];
  const perRecipient = input.recipients.map((r) => {
    const f: string[] = [];
    if (r.originalRecipient && r.originalRecipient !== r.finalRecipient) {
      f.push(foldField("Original-Recipient", `rfc822; ${ascii(r.originalRecipient)}`));
    }
    f.push(foldField("Final-Recipient", `rfc822; ${ascii(r.finalRecipient)}`));
    f.push(`Action: ${r.action}`);
    f.push(`Status: ${r.status}`);
    if (r.remoteMta) f.push(foldField("Remote-MTA", `dns; ${ascii(r.remoteMta)}`));
    if (r.diagnostic) f.push(foldField("Diagnostic-Code", `smtp; ${ascii(formatReply(r.diagnostic))}`));
    if (r.lastAttemptDate) f.push(foldField("Last-Attempt-Date", rfc5322Date(r.lastAttemptDate)));
    if (r.willRetryUntil) f.push(foldField("Will-Retry-Until", rfc5322Date(r.willRetryUntil)));
    return f.join(CRLF);
  });
  const part2 = [
    "Content-Type: message/delivery-status",
    "Content-Description: Delivery report",
    "",
    [perMessage.join(CRLF), ...perRecipient].join(CRLF + CRLF),
    "",
  ].join(CRLF);

  // part 3: what was returned
  const full = input.message ? normaliseMessage(input.message) : undefined;
  const headers = !full && input.headers ? normaliseHeaders(input.headers) : undefined;
  const part3 = full
    ? Buffer.concat([
        Buffer.from(
          [
            "Content-Type: message/rfc822",
            `Content-Description: ${returned}`,
            `Content-Transfer-Encoding: ${full.eightBit ? "8bit" : "7bit"}`,
            "",
            "",
          ].join(CRLF),
        ),
        full.text,
      ])
    : headers
      ? Buffer.concat([
          Buffer.from(
            [
              "Content-Type: text/rfc822-headers",
              `Content-Description: ${returned} Headers`,
              `Content-Transfer-Encoding: ${headers.eightBit ? "8bit" : "7bit"}`,
              "",
              "",
            ].join(CRLF),
          ),
          headers.text,
        ])
      : undefined;

  const chunks: Buffer[] = [
    Buffer.from(`${head}${CRLF}${CRLF}This is a MIME-encapsulated message.${CRLF}${CRLF}`, "utf8"),
    Buffer.from(`--${boundary}${CRLF}${part1}${CRLF}${CRLF}--${boundary}${CRLF}${part2}${CRLF}`, "utf8"),
  ];
  if (part3) {
    chunks.push(Buffer.from(`--${boundary}${CRLF}`), part3, Buffer.from(CRLF));
  }
  chunks.push(Buffer.from(`--${boundary}--${CRLF}`));
  return {
    raw: Buffer.concat(chunks),
    eightBit: (full ?? headers)?.eightBit ?? false,
    utf8Address,
  };
}

/** Something that can stream a stored body (the bus's BodyStore). */
export interface BodyReader {
  read(ref: BodyRef): Promise<Readable>;
}

/**
 * Reads only the header block of a stored message (up to the first empty line, at most `maxBytes`),
 * and stops the stream there instead of fetching the whole body.
 */
export async function readHeaderBlock(
  store: BodyReader,
  ref: BodyRef,
  maxBytes = 64 * 1024,
): Promise<Buffer> {
  const stream = await store.read(ref);
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of stream) {
      const buf = chunk as Buffer;
      chunks.push(buf);
      size += buf.length;
      const all = Buffer.concat(chunks);
      const end = findHeaderEnd(all);
      if (end >= 0) return all.subarray(0, end);
      if (size >= maxBytes) return all.subarray(0, maxBytes);
    }
    return Buffer.concat(chunks);
  } finally {
    stream.destroy();
  }
}

/** Offset just past the last header line (its line break included), or -1. */
function findHeaderEnd(buf: Buffer): number {
  const crlf = buf.indexOf("\r\n\r\n");
  const lf = buf.indexOf("\n\n");
  if (crlf >= 0 && (lf < 0 || crlf < lf)) return crlf + 2;
  if (lf >= 0) return lf + 1;
  return -1;
}
