import { domainToASCII } from "node:url";
import { z } from "zod";

/**
 * An SMTP mailbox (RFC 5321 `Mailbox`, with RFC 6531 UTF-8 allowed in the local part).
 * Quoted local parts are accepted; source routes, address literals and whitespace are not,
 * because they are never needed between our own services and they are the usual relay tricks.
 */
const LOCAL_PART = /^(?:[^\s"@\\()<>,;:[\]\p{Cc}]+|"(?:[^"\\\r\n]|\\[ -~])*")$/u;
const DOMAIN =
  /^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/** Lower-cased ASCII (A-label) form of a domain, or null when it is not a valid host name. */
export function normalizeDomain(domain: string): string | null {
  // the common case, already normalised, without the IDNA conversion (this runs for every address
  // of every message a service publishes or consumes)
  if (DOMAIN.test(domain)) return domain;
  const trimmed = domain.trim().replace(/\.$/, "");
  if (trimmed === "" || trimmed.startsWith("[")) return null;
  const ascii = domainToASCII(trimmed.toLowerCase());
  if (ascii === "" || !DOMAIN.test(ascii)) return null;
  return ascii;
}

export interface ParsedAddress {
  local: string;
  /** ASCII, lower-cased */
  domain: string;
  /** `local@domain` with the domain normalised */
  address: string;
}

/** Splits and validates a mailbox; null when it is not one we accept. */
export function parseAddress(value: string): ParsedAddress | null {
  if (value.length > 320) return null;
  const at = value.lastIndexOf("@");
  if (at <= 0) return null;
  const local = value.slice(0, at);
  if (local.length > 64 * 4 || !LOCAL_PART.test(local)) return null;
  // a dot-atom local part may not start or end with a dot, nor hold two in a row
  if (!local.startsWith('"') && (local.startsWith(".") || local.endsWith(".") || local.includes(".."))) {
    return null;
  }
  const domain = normalizeDomain(value.slice(at + 1));
  if (!domain) return null;
  return { local, domain, address: `${local}@${domain}` };
}

export const Domain = z.string().refine((d) => normalizeDomain(d) === d, {
  message: "must be a lower-case ASCII domain name",
});

export const Address = z
  .string()
  .refine((a) => parseAddress(a) !== null, { message: "must be a mailbox local@domain" });

/** The reverse path: a mailbox, or "" for the null sender (bounces). */
export const ReversePath = z.union([z.literal(""), Address]);
