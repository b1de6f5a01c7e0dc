// Whether an SMTP session's TLS satisfies the policy chosen for its MX host: checked after the
// handshake (which takes any certificate) and before MAIL, so a session a policy refuses never
// carries a message, and an accepted one says what it negotiated.
import { replies } from "@mailpipe/contracts";
import mxConnect from "mx-connect";
import { SmtpFailure, type SmtpSession, type TlsInfo } from "./smtp-session.ts";

/** RFC 8460 4.3 result types this service reports. */
export type TlsRptFailure =
  | "starttls-not-supported"
  | "certificate-host-mismatch"
  | "certificate-expired"
  | "certificate-not-trusted"
  | "validation-failure"
  | "tlsa-invalid"
  | "dnssec-invalid"
  | "dane-required"
  | "sts-policy-fetch-error"
  | "sts-policy-invalid"
  | "sts-webpki-invalid";

export interface TlsaRecord {
  usage: number;
  selector: number;
  matchingType: number;
  data: Buffer;
}

/** The policy for one MX host of one destination, as chosen before connecting. */
export interface TlsDecision {
  /**
   * opportunistic: TLS when offered, any certificate; required: TLS, any certificate; verify: TLS
   * with a certificate valid for the MX name; dane: TLS with a certificate matching `tlsa`
   */
  level: "opportunistic" | "required" | "verify" | "dane";
  /** default (SMTP_TLS_VERIFY), config (TLS_POLICY), mta-sts, dane */
  source: "default" | "config" | "mta-sts" | "dane";
  /** how it reads in a reply or a log line: "verify, MTA-STS enforce", "required, TLS_POLICY mx:*.x" */
  label: string;
  tlsa?: TlsaRecord[];
  /**
   * MTA-STS testing: check as `verify` would, deliver anyway, and report what failed (TLS-RPT).
   * Only with level opportunistic.
   */
  reportOnly?: boolean;
}

/** What a session came to under its policy: for the delivery event and TLS-RPT. */
export interface TlsResult {
  policy: TlsDecision["level"];
  source: TlsDecision["source"];
  version?: string;
  cipher?: string;
  /** the certificate verified for the MX name, or matched a TLSA record */
  verified?: boolean;
  /** set when the policy's check failed (the session was refused, or reportOnly) */
  failure?: TlsRptFailure;
  /** a line for logs: what failed */
  detail?: string;
}

export const OPPORTUNISTIC: TlsDecision = {
  level: "opportunistic",
  source: "default",
  label: "opportunistic",
};

/** Node's verification error codes as TLS-RPT result types. */
function rptTypeOf(code: string | undefined): TlsRptFailure {
  switch (code) {
    case "ERR_TLS_CERT_ALTNAME_INVALID":
    case "Hostname/IP does not match certificate's altnames":
      return "certificate-host-mismatch";
    case "CERT_HAS_EXPIRED":
    case "CERT_NOT_YET_VALID":
      return "certificate-expired";
    default:
      return "certificate-not-trusted";
  }
}

function verifyDane(info: TlsInfo, decision: TlsDecision, exchange: string): string | undefined {
  const check = mxConnect.dane.verifyCertAgainstTlsa(
    info.certificate,
    (decision.tlsa ?? []).map((r) => ({
      usage: r.usage,
      selector: r.selector,
      mtype: r.matchingType,
      cert: r.data,
    })),
    info.chain,
  );
  if (!check.valid) return check.error ?? "no TLSA record matches the certificate";
  // RFC 7672 3.2.3: with DANE-TA the name must still match (DANE-EE pins the key, names do not count)
  if (check.matchedRecord?.usage === 2 && !info.certificate?.checkHost(exchange.replace(/\.$/, ""))) {
    return `the certificate is not valid for ${exchange} (DANE-TA)`;
  }
  return undefined;
}

/** Checks `session` against `decision`; the failure, when there is one, refuses the session. */
export function checkTls(
  session: SmtpSession,
  decision: TlsDecision,
): { result: TlsResult; failure?: SmtpFailure } {
  const info = session.tls;
  const base = { policy: decision.level, source: decision.source };
  const enforcing = decision.level !== "opportunistic";
  const checking = enforcing || decision.reportOnly === true;
  if (!info) {
    if (!checking) return { result: base };
    const failure: TlsRptFailure = decision.level === "dane" ? "dane-required" : "starttls-not-supported";
    const result: TlsResult = { ...base, failure, detail: "STARTTLS not offered" };
    if (!enforcing) return { result };
    return {
      result,
      failure: new SmtpFailure(
        "tls",
        "STARTTLS",
        replies.outboundTlsRequired(session.exchange, decision.label),
      ),
    };
  }
  const negotiated = {
    ...base,
    ...(info.version ? { version: info.version } : {}),
    ...(info.cipher ? { cipher: info.cipher } : {}),
  };
  if (decision.level === "dane") {
    const problem = verifyDane(info, decision, session.exchange);
    if (!problem) return { result: { ...negotiated, verified: true } };
    return {
      result: { ...negotiated, verified: false, failure: "certificate-not-trusted", detail: problem },
      failure: new SmtpFailure(
        "tls",
        "STARTTLS",
        replies.tlsNotVerified(session.exchange, decision.label, problem),
      ),
    };
  }
  if (info.authorized || !checking || decision.level === "required") {
    return { result: { ...negotiated, verified: info.authorized } };
  }
  const detail = info.authorizationError ?? "certificate not trusted";
  const result: TlsResult = {
    ...negotiated,
    verified: false,
    failure: rptTypeOf(info.authorizationError),
    detail,
  };
  if (!enforcing) return { result };
  return {
    result,
    failure: new SmtpFailure(
      "tls",
      "STARTTLS",
      replies.tlsNotVerified(session.exchange, decision.label, detail),
    ),
  };
}
