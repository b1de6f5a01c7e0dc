// Which TLS policy applies to each MX host of a destination. In order, as an operator who ran
// Postfix would expect: a TLS_POLICY rule for the domain or the MX host (the operator's word wins,
// as smtp_tls_policy_maps does), then DANE (DANE=on, usable TLSA records in a validated zone), then
// the domain's MTA-STS policy, then the default (SMTP_TLS_VERIFY: verify, else opportunistic).
import { replies } from "@mailpipe/contracts";
import type { Logger } from "@mailpipe/telemetry";
import { validateMx } from "mailauth/lib/mta-sts.js";
import type { Dane } from "./dane.ts";
import type { MtaSts } from "./mta-sts.ts";
import { SmtpFailure } from "./smtp-session.ts";
import type { TlsDecision, TlsResult } from "./tls-check.ts";
import { staticRule, type TlsPolicyRules } from "./tls-policy.ts";
import type { ReportPolicy, TlsReportStore } from "./tls-report.ts";

/** The policy of one destination, for one transaction. */
export interface DestinationTls {
  /** The policy for this MX host, or why no connection may be made to it. */
  forHost(exchange: string): Promise<{ decision: TlsDecision } | { failure: SmtpFailure }>;
  /** What a new session (or its refusal) came to: for TLS-RPT. Never throws, never waits. */
  report(exchange: string, address: string, result: TlsResult): void;
}

export interface OutboundTls {
  /** Looks up what the destination publishes (MTA-STS); never throws: a failure means no policy. */
  forDestination(domain: string): Promise<DestinationTls>;
}

/** Opportunistic TLS for every host, nothing reported: with no policy configured at all. */
export const OPPORTUNISTIC_ONLY: DestinationTls = {
  forHost: async () => ({
    decision: { level: "opportunistic", source: "default", label: "opportunistic" },
  }),
  report: () => undefined,
};

/** The part of the choice that needs no lookup: TLS_POLICY, then the default. */
export function configuredDecision(
  rules: TlsPolicyRules,
  domain: string,
  exchange: string,
): TlsDecision | undefined {
  const rule = staticRule(rules, domain, exchange);
  if (rule) return { level: rule.level, source: "config", label: `${rule.level}, TLS_POLICY ${rule.match}` };
  return undefined;
}

export function defaultDecision(verifyByDefault: boolean): TlsDecision {
  return verifyByDefault
    ? { level: "verify", source: "default", label: "verify, SMTP_TLS_VERIFY" }
    : { level: "opportunistic", source: "default", label: "opportunistic" };
}

export interface OutboundTlsOptions {
  rules: TlsPolicyRules;
  /** SMTP_TLS_VERIFY */
  verifyByDefault: boolean;
}

/** TLS_POLICY and the default only (MTA-STS and DANE come in through their own modules). */
export function staticOutboundTls(o: OutboundTlsOptions): OutboundTls {
  return {
    async forDestination(domain) {
      return {
        async forHost(exchange) {
          return {
            decision: configuredDecision(o.rules, domain, exchange) ?? defaultDecision(o.verifyByDefault),
          };
        },
        report: () => undefined,
      };
    },
  };
}

export interface PolicyOptions extends OutboundTlsOptions {
  /** MTA_STS=on */
  mtaSts?: MtaSts | undefined;
  /** TLS-RPT counts (Redis) */
  reports?: TlsReportStore | undefined;
  /** DANE=on: TLSA records of an MX host from a validating resolver */
  dane?: Dane | undefined;
  log: Logger;
}

/**
 * The whole choice: TLS_POLICY, then DANE, then MTA-STS, then the default; results under MTA-STS
 * or DANE are counted for TLS-RPT.
 */
export function createOutboundTls(o: PolicyOptions): OutboundTls {
  if (!o.mtaSts && !o.dane) return staticOutboundTls(o);
  return {
    async forDestination(domain) {
      const sts = o.mtaSts ? await o.mtaSts.lookup(domain) : {};
      const policy = sts.policy && sts.policy.mode !== "none" ? sts.policy : undefined;
      const stsReport: ReportPolicy | undefined = policy && {
        type: "sts",
        strings: policy.text.split(/\r?\n/).filter((l) => l.trim() !== ""),
        mxHosts: policy.mx,
      };
      const tlsaReports = new Map<string, ReportPolicy>();
      const count = (rp: ReportPolicy | undefined, exchange: string, address: string, result: TlsResult) => {
        if (rp && o.reports) o.reports.record(domain, rp, exchange, address, result);
      };
      if (sts.failure && !policy && o.reports) {
        // the domain publishes a policy we could not get: reported as such (RFC 8460 4.3.2.1)
        count({ type: "sts", strings: [], mxHosts: [] }, "", "", {
          policy: "opportunistic",
          source: "mta-sts",
          failure: sts.failure.type,
        });
      }
      return {
        async forHost(exchange) {
          const configured = configuredDecision(o.rules, domain, exchange);
          if (configured) return { decision: configured };
          if (o.dane) {
            const tlsa = await o.dane.lookup(exchange);
            if ("failure" in tlsa) return { failure: tlsa.failure };
            if (tlsa.records.length > 0) {
              tlsaReports.set(exchange, {
                type: "tlsa",
                strings: tlsa.records.map(
                  (r) => `${r.usage} ${r.selector} ${r.matchingType} ${r.data.toString("hex")}`,
                ),
                mxHosts: [],
              });
              return {
                decision: { level: "dane", source: "dane", label: "dane", tlsa: tlsa.records },
              };
            }
            if (tlsa.encryptOnly) {
              return {
                decision: {
                  level: "required",
                  source: "dane",
                  label: "required, DANE without usable TLSA records",
                },
              };
            }
          }
          if (policy) {
            const match = validateMx(exchange, { mode: policy.mode, mx: policy.mx });
            if (policy.mode === "enforce") {
              if (!match.valid) {
                const failure = new SmtpFailure(
                  "policy",
                  "connect",
                  replies.tlsPolicyMismatch(exchange, domain),
                );
                failure.tls = {
                  policy: "verify",
                  source: "mta-sts",
                  failure: "validation-failure",
                  detail: `MX ${exchange} not in the policy`,
                };
                count(stsReport, exchange, "", failure.tls);
                return { failure };
              }
              return { decision: { level: "verify", source: "mta-sts", label: "verify, MTA-STS enforce" } };
            }
            if (!match.valid) {
              o.log.info(
                { domain, mx: exchange },
                "MTA-STS testing: MX host not in the policy; delivering anyway",
              );
              count(stsReport, exchange, "", {
                policy: "opportunistic",
                source: "mta-sts",
                failure: "validation-failure",
              });
            }
            return {
              decision: {
                level: "opportunistic",
                source: "mta-sts",
                label: "opportunistic, MTA-STS testing",
                reportOnly: true,
              },
            };
          }
          return { decision: defaultDecision(o.verifyByDefault) };
        },
        report(exchange, address, result) {
          if (result.source === "dane") count(tlsaReports.get(exchange), exchange, address, result);
          else if (result.source === "mta-sts") count(stsReport, exchange, address, result);
        },
      };
    },
  };
}
