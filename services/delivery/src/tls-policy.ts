// The outbound TLS policy an operator configures (TLS_POLICY, YAML or JSON) per destination domain
// or per MX host pattern, like Postfix's smtp_tls_policy_maps: `opportunistic`, `required` (TLS with
// any certificate) or `verify` (TLS with a certificate valid for the MX name).
import { parse as parseYaml } from "yaml";
import { z } from "zod";

export const TLS_LEVELS = ["opportunistic", "required", "verify"] as const;
export type TlsLevel = (typeof TLS_LEVELS)[number];

export interface TlsPolicyRules {
  /** by destination domain, lower-case */
  domains: Map<string, TlsLevel>;
  /** by MX host: exact names, and `*.suffix` patterns (suffix without the dot, lower-case) */
  hosts: Map<string, TlsLevel>;
  wildcards: { suffix: string; level: TlsLevel }[];
}

/** A configured rule that applies to one MX host of one destination; `match` names it for logs. */
export interface StaticRule {
  level: TlsLevel;
  match: string;
}

const HOST_NAME =
  /^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$/;

const HINT = `each entry is <domain> or "mx:<host>" or "mx:*.<suffix>" with one of ${TLS_LEVELS.join(", ")}`;

/** TLS_POLICY: `{ <domain> | "mx:<host>" | "mx:*.<suffix>": opportunistic | required | verify }`. */
export function tlsPolicySetting() {
  return z
    .string()
    .default("")
    .transform((v, ctx): TlsPolicyRules => {
      const out: TlsPolicyRules = { domains: new Map(), hosts: new Map(), wildcards: [] };
      if (v.trim() === "") return out;
      let doc: unknown;
      try {
        doc = parseYaml(v);
      } catch (err) {
        ctx.addIssue({ code: "custom", message: `not YAML or JSON: ${(err as Error).message}` });
        return z.NEVER;
      }
      if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
        ctx.addIssue({ code: "custom", message: `expected a mapping: ${HINT}` });
        return z.NEVER;
      }
      for (const [rawKey, value] of Object.entries(doc)) {
        const key = rawKey.trim().toLowerCase().replace(/\.$/, "");
        const level = typeof value === "string" ? value.trim().toLowerCase() : value;
        if (!(TLS_LEVELS as readonly unknown[]).includes(level)) {
          ctx.addIssue({
            code: "custom",
            message: `"${rawKey}": ${JSON.stringify(value)} is not a level: ${HINT}`,
          });
          continue;
        }
        const isMx = key.startsWith("mx:");
        const name = isMx ? key.slice(3) : key;
        const wildcard = isMx && name.startsWith("*.");
        const bare = wildcard ? name.slice(2) : name;
        if (!HOST_NAME.test(bare)) {
          ctx.addIssue({ code: "custom", message: `"${rawKey}" is not a domain or MX host: ${HINT}` });
          continue;
        }
        if (!isMx) out.domains.set(bare, level as TlsLevel);
        else if (wildcard) out.wildcards.push({ suffix: bare, level: level as TlsLevel });
        else out.hosts.set(bare, level as TlsLevel);
      }
      return out;
    });
}

const clean = (name: string) => name.trim().toLowerCase().replace(/\.$/, "");

/** The configured rule for this MX host of this domain: a domain rule wins over an MX rule. */
export function staticRule(rules: TlsPolicyRules, domain: string, exchange: string): StaticRule | undefined {
  const d = clean(domain);
  const byDomain = rules.domains.get(d);
  if (byDomain) return { level: byDomain, match: d };
  const host = clean(exchange);
  const byHost = rules.hosts.get(host);
  if (byHost) return { level: byHost, match: `mx:${host}` };
  // the longest suffix wins, so a specific pattern can override a broad one
  let best: { suffix: string; level: TlsLevel } | undefined;
  for (const w of rules.wildcards) {
    if (host.endsWith(`.${w.suffix}`) && (!best || w.suffix.length > best.suffix.length)) best = w;
  }
  return best ? { level: best.level, match: `mx:*.${best.suffix}` } : undefined;
}
