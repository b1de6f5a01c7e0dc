import { rfc5322Date } from "@mailpipe/smtp-edge";

export interface FixupInput {
  /** the message's own header fields, as values by name (case-insensitive) */
  header(name: string): string[];
  queueId: string;
  /** MAIL_HOSTNAME */
  hostname: string;
  date?: Date;
}

export interface Fixups {
  /** header fields to add (CRLF-terminated each; "" when none are missing) */
  fields: string;
  /** the Message-ID the message leaves with (its own, or the one added) */
  messageId: string | undefined;
  added: ("Message-ID" | "Date")[];
}

/**
 * RFC 6409 §8.2–8.3: a submission server may add a missing Message-ID and Date. Mail clients
 * usually set both; scripts and devices often do not, and many receivers score mail without them.
 */
export function submissionFixups({ header, queueId, hostname, date = new Date() }: FixupInput): Fixups {
  const added: Fixups["added"] = [];
  let fields = "";
  let messageId = header("message-id")[0]?.slice(0, 998) || undefined;
  if (!messageId) {
    messageId = `<${queueId}@${hostname}>`;
    fields += `Message-ID: ${messageId}\r\n`;
    added.push("Message-ID");
  }
  if (header("date").length === 0) {
    fields += `Date: ${rfc5322Date(date)}\r\n`;
    added.push("Date");
  }
  return { fields, messageId, added };
}
