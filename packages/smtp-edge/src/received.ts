export interface ReceivedOptions {
  /** our host name (MAIL_HOSTNAME) */
  by: string;
  queueId: string;
  /** the client's IP address */
  ip: string;
  /** the EHLO/HELO argument */
  helo: string;
  /** the client's reverse DNS name, when it was looked up and found */
  hostname?: string | undefined;
  esmtp: boolean;
  /** TLS protocol and cipher, when the session is encrypted */
  tls?: { protocol: string; cipher: string } | undefined;
  authenticated: boolean;
  /** the envelope recipients; `for <…>` is written only when there is exactly one */
  recipients: readonly string[];
  date?: Date;
  /**
   * Leave out the `from` clause (client IP, HELO, reverse name): the submission service's privacy
   * setting, so a user's home IP address does not travel with their mail.
   */
  hideClient?: boolean;
  /** the authenticated user, named in the field only when the operator asks for it (msa) */
  authenticatedUser?: string | undefined;
}

/** RFC 3848 protocol names: SMTP, ESMTP, ESMTPA, ESMTPS, ESMTPSA. */
export function receivedProtocol(o: { esmtp: boolean; tls: boolean; authenticated: boolean }): string {
  if (!o.esmtp) return "SMTP";
  return `ESMTP${o.tls ? "S" : ""}${o.authenticated ? "A" : ""}`;
}

/** RFC 5322 date-time in UTC, e.g. `Thu, 23 Nov 2025 17:47:00 +0000`. */
export function rfc5322Date(date: Date): string {
  return date.toUTCString().replace(/GMT$/, "+0000");
}

/** Client-supplied text in a Received field: no comment or clause delimiters, bounded. */
function token(value: string): string {
  const clean = value.replace(/[^\x21-\x7e]|[()<>;\\"]/g, "_").slice(0, 255);
  return clean === "" ? "unknown" : clean;
}

/**
 * The Received header field (with its trailing CRLF) for a message we accept, RFC 5321 §4.4:
 *
 * ```
 * Received: from client.example (client.example [192.0.2.1])
 * 	(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)
 * 	by mx.example.net (mailpipe) with ESMTPS id 01J...
 * 	for <user@example.net>; Thu, 23 Nov 2025 17:47:00 +0000
 * ```
 */
export function buildReceived(o: ReceivedOptions): string {
  const lines: string[] = [];
  if (!o.hideClient) {
    const ip = o.ip.includes(":") ? `IPv6:${o.ip}` : o.ip;
    const rdns = o.hostname ? `${token(o.hostname)} ` : "";
    lines.push(`from ${token(o.helo)} (${rdns}[${ip}])`);
  }
  if (o.authenticatedUser) lines.push(`(Authenticated sender: ${token(o.authenticatedUser)})`);
  if (o.tls) lines.push(`(using ${token(o.tls.protocol)} with cipher ${token(o.tls.cipher)})`);
  const protocol = receivedProtocol({ esmtp: o.esmtp, tls: !!o.tls, authenticated: o.authenticated });
  lines.push(`by ${o.by} (mailpipe) with ${protocol} id ${o.queueId}`);
  const date = rfc5322Date(o.date ?? new Date());
  const only = o.recipients.length === 1 ? o.recipients[0] : undefined;
  if (only !== undefined) lines.push(`for <${only}>; ${date}`);
  else lines[lines.length - 1] += `; ${date}`;
  return `Received: ${lines.join("\r\n\t")}\r\n`;
}
