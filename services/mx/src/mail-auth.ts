import { Readable } from "node:stream";
import { type Reply, replies } from "@mailpipe/contracts";
import type { MailauthAnswer, MailauthResolverFn } from "@mailpipe/dns";
import {
  type AuthenticateOptions,
  type AuthenticateResult,
  authenticate,
  type SPFResult,
  spf,
} from "mailauth";

type MailauthResolver = NonNullable<AuthenticateOptions["resolver"]>;

/**
 * A resolver that asks each name and type once per transaction: SPF evaluated at MAIL FROM and
 * again inside authenticate() at the end of DATA sees the same answers (a temperror stays one),
 * and the second evaluation costs no lookups.
 */
export function transactionResolver(base: MailauthResolverFn): MailauthResolver {
  const seen = new Map<string, Promise<MailauthAnswer>>();
  const resolve = (name: string, rrtype: string) => {
    const key = `${rrtype.toUpperCase()} ${name.toLowerCase()}`;
    let answer = seen.get(key);
    if (!answer) {
      answer = base(name, rrtype);
      seen.set(key, answer);
    }
    return answer;
  };
  // mailauth's type lists only TXT/A answers; MX answers are objects, as node's resolver gives them
  return resolve as unknown as MailauthResolver;
}

export interface ClientIdentity {
  ip: string;
  helo: string;
  /** MAIL FROM, "" for the null sender */
  sender: string;
}

/** SPF alone, for the MAIL FROM time check. A DNS problem is a temperror, never an exception. */
export async function checkSpf(
  who: ClientIdentity,
  opts: { mta: string; resolver: MailauthResolver },
): Promise<SPFResult["status"]["result"]> {
  const result = await spf({
    sender: who.sender,
    ip: who.ip,
    helo: who.helo || who.ip,
    mta: opts.mta,
    resolver: opts.resolver,
  });
  return result.status.result;
}

/** The key an ARC set is sealed with: the forwarding domain's DKIM key. */
export interface ArcSeal {
  signingDomain: string;
  selector: string;
  privateKey: string;
}

export interface AuthOutcome {
  /** the Authentication-Results field mailauth built (after the ARC set, when sealed), CRLF-terminated */
  header: string;
  /** with a seal asked for: whether the ARC set was made (not for a broken chain or an unusable key) */
  sealed?: boolean;
  spf: string;
  dkim: string[];
  dmarc: string;
  arc: string;
  /** the author domain's DMARC verdict, when there is one */
  dmarcPolicy: { domain: string; policy: string; result: string } | undefined;
  /** some check could not be completed because of a DNS failure */
  temporary: boolean;
}

/** SPF, DKIM, DMARC and ARC of one message (BIMI is off: it is for mail clients, not for the MX). */
export async function authenticateMessage(
  chunks: readonly Buffer[],
  who: ClientIdentity,
  opts: { mta: string; resolver: MailauthResolver; seal?: ArcSeal | undefined },
): Promise<AuthOutcome> {
  // one buffer for mailauth to take in a single write (a stream of the intake's many small chunks
  // cost more than the checks); a large message is streamed rather than copied whole once more
  const size = chunks.reduce((n, c) => n + c.length, 0);
  const input =
    size <= 1024 * 1024
      ? Buffer.concat(chunks as Buffer[], size)
      : Readable.from(chunks, { objectMode: false });
  const result: AuthenticateResult = await authenticate(input, {
    ip: who.ip,
    helo: who.helo || who.ip,
    sender: who.sender,
    mta: opts.mta,
    resolver: opts.resolver,
    disableBimi: true,
    ...(opts.seal ? { seal: opts.seal } : {}),
  });
  const dkim = (result.dkim.results ?? []).map((r) => r.status.result);
  const spfResult = result.spf ? result.spf.status.result : "none";
  const dmarc = result.dmarc;
  const sealErrors = result.arc ? (result.arc as { sealErrors?: unknown[] }).sealErrors : undefined;
  return {
    header: opts.seal ? arcSetAndResults(result.headers) : authenticationResultsField(result.headers),
    ...(opts.seal ? { sealed: !sealErrors?.length && /^ARC-Seal:/im.test(result.headers) } : {}),
    spf: spfResult,
    dkim,
    dmarc: dmarc ? dmarc.status.result : "none",
    arc: result.arc ? result.arc.status.result : "none",
    dmarcPolicy: dmarc
      ? {
          domain: dmarc.status.header?.from ?? dmarc.domain,
          policy: dmarc.policy,
          result: dmarc.status.result,
        }
      : undefined,
    temporary: [spfResult, ...dkim, dmarc ? dmarc.status.result : ""].some(
      (r) => r === "temperror" || r === "temperr",
    ),
  };
}

/**
 * mailauth's `headers` holds Received-SPF then Authentication-Results (without ARC sealing).
 * Only the Authentication-Results field is kept: it already carries the SPF result. It starts a
 * line; a sender address quoted into Received-SPF cannot contain CRLF, so the match is reliable.
 */
export function authenticationResultsField(headers: string): string {
  let at = 0;
  if (!headers.startsWith("Authentication-Results:")) {
    const i = headers.indexOf("\r\nAuthentication-Results:");
    if (i < 0) throw new Error("mailauth produced no Authentication-Results field");
    at = i + 2;
  }
  const field = headers.slice(at);
  return field.endsWith("\r\n") ? field : `${field}\r\n`;
}

/**
 * With sealing: the ARC set mailauth made (ARC-Seal, ARC-Message-Signature,
 * ARC-Authentication-Results) and the Authentication-Results field, without Received-SPF (the
 * results already carry SPF). Fields start a line; continuation lines start with white space.
 */
export function arcSetAndResults(headers: string): string {
  const fields = headers.split(/\r\n(?=[^ \t])/).filter((f) => f !== "");
  const keep = fields.filter((f) =>
    /^(arc-seal|arc-message-signature|arc-authentication-results|authentication-results):/i.test(f),
  );
  if (!keep.some((f) => /^authentication-results:/i.test(f))) {
    throw new Error("mailauth produced no Authentication-Results field");
  }
  return keep.map((f) => (f.endsWith("\r\n") ? f : `${f}\r\n`)).join("");
}

/**
 * What DMARC asks of us: `p=reject` and a failing result → refuse (550 5.7.1), unless a DNS
 * temperror may be why it failed (then 451 4.4.3: a DNS problem never causes a permanent refusal).
 */
export function dmarcDecision(outcome: AuthOutcome): Reply | undefined {
  const d = outcome.dmarcPolicy;
  if (d?.result !== "fail" || d.policy !== "reject") return undefined;
  if (outcome.temporary) return replies.dnsTempFail(d.domain);
  return replies.dmarcReject(d.domain);
}
