// Envelope recipients → the recipients the router tracks: aliases expanded, +tags resolved, local
// mailboxes and remote addresses told apart, each destination once per message.
import { type EnvelopeRecipient, parseAddress, type Reply, replies } from "@mailpipe/contracts";
import type { Directory } from "@mailpipe/directory";
import type { RecipientRecord } from "@mailpipe/queue";

type NotifyFlags = Pick<RecipientRecord, "notifyFailure" | "notifyDelay" | "notifySuccess" | "notify">;

/** RFC 3461 4.1: without NOTIFY, failures and delays are reported, successes are not. */
function notifyFlags(rcpt: EnvelopeRecipient): NotifyFlags {
  if (!rcpt.notify) return { notifyFailure: true, notifyDelay: true, notifySuccess: false };
  return {
    notifyFailure: rcpt.notify.includes("FAILURE"),
    notifyDelay: rcpt.notify.includes("DELAY"),
    notifySuccess: rcpt.notify.includes("SUCCESS"),
    notify: rcpt.notify,
  };
}

/**
 * Resolves every envelope recipient through the directory. Unknown users in our domains (possible
 * for submissions) and alias loops come back already bounced, with the reply that says why.
 */
export function expandRecipients(
  directory: Directory,
  rcptTo: readonly EnvelopeRecipient[],
  opts: { plusSeparator: string; now: number },
): RecipientRecord[] {
  const out = new Map<string, RecipientRecord>();
  const at = new Date(opts.now).toISOString();
  const add = (r: Omit<RecipientRecord, "seq">) => {
    if (!out.has(r.rid)) out.set(r.rid, { ...r, seq: out.size });
  };
  const originalOf = (rcpt: EnvelopeRecipient, address: string) => {
    const original = rcpt.original ?? rcpt.address;
    return original !== address ? { original } : {};
  };
  const bounce = (rcpt: EnvelopeRecipient, address: string, reply: Reply) =>
    add({
      rid: `u:${address}`,
      kind: "none",
      address,
      ...originalOf(rcpt, address),
      state: "bounced",
      attempt: 1,
      lastReply: reply,
      lastAttemptAt: at,
      ...notifyFlags(rcpt),
    });

  for (const rcpt of rcptTo) {
    const flags = notifyFlags(rcpt);
    const res = directory.resolve(rcpt.address, { plusSeparator: opts.plusSeparator });
    if (res.nonLocal) {
      const parsed = parseAddress(rcpt.address);
      if (!parsed) continue; // the contract only lets valid addresses through
      add({
        rid: `r:${parsed.address}`,
        kind: "remote",
        address: parsed.address,
        ...(rcpt.original && rcpt.original !== parsed.address ? { original: rcpt.original } : {}),
        domain: parsed.domain,
        state: "pending",
        attempt: 1,
        ...flags,
      });
      continue;
    }
    for (const l of res.local) {
      add({
        rid: `l:${l.mailbox}`,
        kind: "local",
        address: l.address,
        ...originalOf(rcpt, l.address),
        mailbox: l.mailbox,
        ...(l.folder ? { folder: l.folder } : {}),
        state: "pending",
        attempt: 1,
        ...flags,
      });
    }
    for (const target of res.remote) {
      const parsed = parseAddress(target);
      if (!parsed) continue;
      add({
        rid: `r:${parsed.address}`,
        kind: "remote",
        address: parsed.address,
        // forwarding: the alias is what the sender addressed
        original: rcpt.address,
        forwardedBy: rcpt.address.slice(rcpt.address.lastIndexOf("@") + 1).toLowerCase(),
        domain: parsed.domain,
        state: "pending",
        attempt: 1,
        ...flags,
      });
    }
    for (const unknown of res.unknown) bounce(rcpt, unknown, replies.noSuchUser(unknown));
    // a loop inside an alias that still reaches someone is not the sender's problem
    const nowhere = res.local.length === 0 && res.remote.length === 0 && res.unknown.length === 0;
    if (nowhere && res.loops.length > 0) bounce(rcpt, rcpt.address, replies.aliasLoop(rcpt.address));
  }
  return [...out.values()];
}
