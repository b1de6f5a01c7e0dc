import { normalizeDomain, parseAddress, type Reply, replies } from "@mailpipe/contracts";
import type { Directory } from "@mailpipe/directory";

export type RecipientVerdict = { ok: true; address: string } | { ok: false; reply: Reply };

const refuse = (reply: Reply): RecipientVerdict => ({ ok: false, reply });

/**
 * RCPT TO on port 25: mail only for our own domains, only for users and aliases that exist.
 *
 * Relay tricks are refused like any other relay attempt (`550 5.7.1`), as Postfix does with
 * `allow_untrusted_routing = no`: a local part holding a routing character (`%`, `!`, `@`, also
 * inside quotes) asks the next hop to relay elsewhere, and an address literal (`user@[192.0.2.1]`)
 * names no domain of ours. A source route (`<@relay:user@domain>`) is already stripped by
 * smtp-server, so the address after it decides. A domainless `postmaster` (RFC 5321 §4.1.1.3) is
 * the postmaster of our first domain.
 */
export function checkRecipient(directory: Directory, address: string): RecipientVerdict {
  if (address.toLowerCase() === "postmaster") {
    const first = directory.domains()[0];
    const mapped = first ? `postmaster@${first}` : undefined;
    if (mapped && directory.acceptsRecipient(mapped) === "ok") return { ok: true, address: mapped };
    return refuse(replies.noSuchUser("postmaster"));
  }
  const at = address.lastIndexOf("@");
  if (at <= 0) return refuse(replies.badRecipientSyntax());
  const local = address.slice(0, at);
  const domainPart = address.slice(at + 1);
  if (domainPart.startsWith("[")) return refuse(replies.relayDenied());
  if (/[%!@]/.test(local)) return refuse(replies.relayDenied());
  const domain = normalizeDomain(domainPart);
  if (domain === null) return refuse(replies.badRecipientSyntax());
  if (!directory.isLocalDomain(domain)) return refuse(replies.relayDenied());
  const parsed = parseAddress(address);
  if (!parsed) return refuse(replies.badRecipientSyntax());
  switch (directory.acceptsRecipient(parsed.address)) {
    case "ok":
      return { ok: true, address: parsed.address };
    case "unknown-user":
      return refuse(replies.noSuchUser(parsed.address));
    case "srs-invalid": {
      // a bounce to a sender we never rewrote (forged), or rewrote too long ago
      const r = directory.srsReverse(parsed.address);
      return refuse(replies.srsInvalid(r && !r.ok ? r.reason : "forged"));
    }
    default:
      return refuse(replies.relayDenied());
  }
}
