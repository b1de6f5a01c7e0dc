import { parseAddress, type Reply, replies } from "@mailpipe/contracts";
import addressparser from "nodemailer/lib/addressparser/index.js";

/** What sender authorization needs from the directory. */
export interface SendAsCheck {
  canSendAs(user: string, address: string): boolean;
}

/** The MAIL FROM check: the null sender is refused, any other address must be the user's. */
export function checkEnvelopeSender(dir: SendAsCheck, user: string, mailFrom: string): Reply | undefined {
  if (mailFrom === "") return replies.nullSenderRefused();
  return dir.canSendAs(user, mailFrom) ? undefined : replies.senderNotOwned(mailFrom);
}

/** Every mailbox in one From field value (groups flattened, display names dropped). */
export function fromAddresses(value: string): string[] {
  return addressparser(value, { flatten: true })
    .map((a) => a.address.trim())
    .filter((a) => a !== "");
}

export type HeaderFromResult =
  | { ok: true; addresses: string[] /** the author domain: DKIM signs for it */; domain: string }
  | { ok: false; reply: Reply };

/**
 * The end-of-DATA check: exactly one From field, holding at least one address, every one of which
 * the user may send as. The first address's domain is the one DKIM signs for (DMARC aligns with it).
 */
export function checkHeaderFrom(
  dir: SendAsCheck,
  user: string,
  fromValues: readonly string[],
): HeaderFromResult {
  if (fromValues.length === 0) return { ok: false, reply: replies.noFromHeader() };
  if (fromValues.length > 1) return { ok: false, reply: replies.manyFromHeaders() };
  const addresses = fromAddresses(fromValues[0]!);
  if (addresses.length === 0) return { ok: false, reply: replies.badFromHeader() };
  for (const address of addresses) {
    if (!dir.canSendAs(user, address)) return { ok: false, reply: replies.senderNotOwned(address) };
  }
  const domain = parseAddress(addresses[0]!)?.domain;
  if (!domain) return { ok: false, reply: replies.senderNotOwned(addresses[0]!) };
  return { ok: true, addresses, domain };
}
