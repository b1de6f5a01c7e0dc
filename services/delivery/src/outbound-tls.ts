// Which TLS policy applies to each MX host of a destination. In order, as an operator who ran
// Postfix would expect: a TLS_POLICY rule for the domain or the MX host (the operator's word wins,
// as smtp_tls_policy_maps does), then DANE (DANE=on, usable TLSA records in a validated zone), then
// the domain's MTA-STS policy, then the default (SMTP_TLS_VERIFY: verify, else opportunistic).
import type { SmtpFailure } from "./smtp-session.ts";
import type { TlsDecision, TlsResult } from "./tls-check.ts";
import { staticRule, type TlsPolicyRules } from "./tls-policy.ts";

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
