/*
 * Two small, targeted patches of smtp-server 3.21.x (pinned in package.json; patches.test.ts fails
 * when an upgrade changes the behaviour they rely on):
 *
 * smtp-server has no supported option for either; the upstream pull requests are written up in
 * docs/upstream/smtp-server-{enhanced-status-codes,reply-event,quoted-local-part}.md.
 *
 * 1. Enhanced status codes. smtp-server derives the enhanced code from the basic one (550 is always
 *    5.1.1), so a hook refusing with "550 relay denied" would go out as `550 5.1.1`. Our SmtpError
 *    puts the right code at the start of its message ("5.7.1 Relay access denied"); when enhanced
 *    codes are on and a reply text starts with `X.Y.Z ` of the reply's class, that code is sent
 *    instead of the derived one. The same hook reports every reply (code and enhanced code) to the
 *    server's reply listener, for metrics.
 *
 * 2. Quoted local parts holding "@". smtp-server splits the address on "@" and answers
 *    `"user@other.test"@example.test` with 501 before any hook runs. RFC 5321 allows it, and the
 *    receiving service must decide (mx refuses it as a relay attempt with 550 5.7.1), so such an
 *    address in RCPT TO is parsed with the quoted part set aside and handed to the hook whole.
 */

import type { SMTPServer } from "smtp-server";
import { SMTPConnection } from "smtp-server/lib/smtp-connection.js";

/** Called for every reply a server writes: basic code, enhanced code ("" when none). */
export type ReplyListener = (code: number, enhanced: string) => void;

const listeners = new WeakMap<SMTPServer, ReplyListener>();

/** Registers the reply listener of one server (one per server). */
export function onReplies(server: SMTPServer, listener: ReplyListener): void {
  listeners.set(server, listener);
}

const LEADING_CODE = /^([245])\.(\d{1,3})\.(\d{1,3}) /;

/** The enhanced code a reply text starts with, when it matches the reply's class; else undefined. */
export function leadingEnhancedCode(code: number, text: unknown): string | undefined {
  if (typeof text !== "string") return undefined;
  const m = LEADING_CODE.exec(text);
  if (!m || m[1] !== String(Math.floor(code / 100))) return undefined;
  return `${m[1]}.${m[2]}.${m[3]}`;
}

// RFC 5321 qtextSMTP / quoted-pairSMTP, holding at least one "@"; then @domain.
const QUOTED_AT_LOCAL = /<((?:"(?:[ !#-[\]-~]|\\[ -~])*"))@([^<>"@\s]+)>/;

type Send = SMTPConnection["send"];
type ParseAddress = (rawName: string, rawCommand: Buffer | string) => unknown;
interface Patchable {
  send: Send;
  _parseAddressCommand: ParseAddress;
  _getEnhancedStatusCode(code: number, context?: string | false): string;
}

let installed = false;

/** smtp-server's own methods, kept for the pin test (patches.test.ts). */
export const unpatched: { send?: Send; parseAddress?: ParseAddress } = {};

/** Installs both patches once per process (idempotent). */
export function installSmtpServerPatches(): void {
  if (installed) return;
  installed = true;
  const proto = SMTPConnection.prototype as unknown as Patchable;

  const send = proto.send;
  unpatched.send = send;
  proto.send = function patchedSend(this: SMTPConnection, code, data, context) {
    const self = this as unknown as Patchable & SMTPConnection;
    const enhancedOn = self._server.options.hideENHANCEDSTATUSCODES === false;
    const own = enhancedOn ? leadingEnhancedCode(code, data) : undefined;
    const listener = listeners.get(self._server);
    listener?.(code, own ?? self._getEnhancedStatusCode(code, context));
    // context false = "no derived code": the text already carries ours
    return send.call(this, code, data, own ? false : context);
  };

  const parse = proto._parseAddressCommand;
  unpatched.parseAddress = parse;
  proto._parseAddressCommand = function patchedParse(this: SMTPConnection, rawName, rawCommand) {
    const parsed = parse.call(this, rawName, rawCommand) as { address: string } | false;
    if (parsed || String(rawName).trim().toUpperCase() !== "RCPT TO") return parsed;
    const command = String(rawCommand ?? "");
    const m = QUOTED_AT_LOCAL.exec(command);
    if (!m?.[1]?.includes("@")) return parsed;
    // parse with a plain local part so the domain and parameters get smtp-server's own checks
    const retry = parse.call(this, rawName, command.replace(m[0], `<quoted@${m[2]}>`)) as
      | { address: string }
      | false;
    if (!retry) return false;
    retry.address = `${m[1]}${retry.address.slice(retry.address.lastIndexOf("@"))}`;
    return retry;
  };
}
