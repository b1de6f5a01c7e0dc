// The destination limits an operator configures: defaults (DESTINATION_CONNECTIONS, DESTINATION_RATE)
// and overrides (DESTINATION_LIMITS, YAML or JSON) per domain or per MX host pattern, resolved for one
// destination site. The limits are shared by every delivery replica through Redis (admission.ts).
import type { SitePolicy } from "@mailpipe/queue";
import { parse as parseYaml } from "yaml";
import { z } from "zod";

export interface Rate {
  messages: number;
  perMs: number;
}

/** One override: either field may be left out (it then comes from the next rule, or the default). */
export interface LimitRule {
  connections?: number;
  /** null: no rate limit (overrides a default rate) */
  rate?: Rate | null;
}

export interface DestinationLimits {
  /** by destination domain, lower-case */
  domains: Map<string, LimitRule>;
  /** by MX host: exact names, and `*.suffix` patterns (suffix without the dot, lower-case) */
  hosts: Map<string, LimitRule>;
  wildcards: { suffix: string; rule: LimitRule }[];
}

const PERIODS: Record<string, number> = {
  s: 1000,
  sec: 1000,
  second: 1000,
  m: 60_000,
  min: 60_000,
  minute: 60_000,
  h: 3_600_000,
  hour: 3_600_000,
  d: 86_400_000,
  day: 86_400_000,
};

const RATE_HINT = "a rate is N/s, N/min, N/h or N/d (e.g. 300/min), or 0 for none";

/** `300/min` → { messages: 300, perMs: 60000 }; `0`, `none` or "" → null (no limit). */
export function parseRate(text: string): Rate | null | undefined {
  const t = text.trim().toLowerCase();
  if (t === "" || t === "0" || t === "none") return null;
  const m = /^(\d+)\s*\/\s*([a-z]+)$/.exec(t);
  const perMs = m ? PERIODS[m[2]!] : undefined;
  const messages = m ? Number(m[1]) : 0;
  if (!perMs || !Number.isSafeInteger(messages)) return undefined;
  return messages === 0 ? null : { messages, perMs };
}

/** DESTINATION_RATE: the default rate per site (empty: none). */
export function rateSetting(defaultValue = "") {
  return z
    .string()
    .default(defaultValue)
    .transform((v, ctx) => {
      const rate = parseRate(v);
      if (rate === undefined) {
        ctx.addIssue({ code: "custom", message: `"${v}" is not a rate: ${RATE_HINT}` });
        return z.NEVER;
      }
      return rate;
    });
}

const HOST_NAME =
  /^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$/;

/** DESTINATION_LIMITS: `{ <domain> | "mx:<host>" | "mx:*.<suffix>": { connections?, rate? } }`. */
export function limitsSetting() {
  return z
    .string()
    .default("")
    .transform((v, ctx): DestinationLimits => {
      const out: DestinationLimits = { domains: new Map(), hosts: new Map(), wildcards: [] };
      if (v.trim() === "") return out;
      let doc: unknown;
      try {
        doc = parseYaml(v); // JSON is YAML too
      } catch (err) {
        ctx.addIssue({
          code: "custom",
          message: `not YAML or JSON: ${(err as Error).message.split("\n")[0]}`,
        });
        return z.NEVER;
      }
      if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
        ctx.addIssue({
          code: "custom",
          message: 'must be a map of destinations, e.g. "gmail.com: { connections: 20, rate: 300/min }"',
        });
        return z.NEVER;
      }
      for (const [key, value] of Object.entries(doc as Record<string, unknown>)) {
        const bad = (why: string) => ctx.addIssue({ code: "custom", message: `entry "${key}": ${why}` });
        const rule = parseRule(value, bad);
        if (!rule) continue;
        const name = key.trim().toLowerCase().replace(/\.$/, "");
        if (name.startsWith("mx:")) {
          const host = name.slice(3).trim();
          const suffix = host.startsWith("*.") ? host.slice(2) : undefined;
          if (!HOST_NAME.test(suffix ?? host)) {
            bad('not an MX host name or pattern (use "mx:mx1.example.net" or "mx:*.example.net")');
          } else if (suffix) out.wildcards.push({ suffix, rule });
          else out.hosts.set(host, rule);
        } else if (!HOST_NAME.test(name)) {
          bad('not a domain name (MX host patterns are written "mx:*.example.net")');
        } else out.domains.set(name, rule);
      }
      // the longest suffix is the most specific
      out.wildcards.sort((a, b) => b.suffix.length - a.suffix.length);
      return out;
    });
}

function parseRule(value: unknown, bad: (why: string) => void): LimitRule | undefined {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    bad("must be a map with connections and/or rate, e.g. { connections: 20, rate: 300/min }");
    return undefined;
  }
  const rule: LimitRule = {};
  let ok = true;
  for (const [field, v] of Object.entries(value as Record<string, unknown>)) {
    if (field === "connections") {
      if (typeof v !== "number" || !Number.isInteger(v) || v < 1 || v > 100_000) {
        bad(`connections must be a whole number from 1 to 100000 (got ${JSON.stringify(v)})`);
        ok = false;
      } else rule.connections = v;
    } else if (field === "rate") {
      const rate = typeof v === "number" ? (v === 0 ? null : undefined) : parseRate(String(v ?? ""));
      if (rate === undefined) {
        bad(`rate ${JSON.stringify(v)}: ${RATE_HINT}`);
        ok = false;
      } else rule.rate = rate;
    } else {
      bad(`unknown field "${field}" (connections, rate)`);
      ok = false;
    }
  }
  return ok ? rule : undefined;
}

export interface Defaults {
  connections: number;
  rate: Rate | null;
}

/**
 * The limits for a destination: the domain's rule, then the most specific MX host rule matching any
 * of the site's hosts (an exact name before the longest `*.` suffix), then the defaults, field by
 * field. `priority` says how specific the most specific rule used is, so that domains sharing a site
 * keep the more specific limits in Redis.
 */
export function policyFor(
  limits: DestinationLimits,
  defaults: Defaults,
  domain: string,
  exchanges: readonly string[],
): SitePolicy {
  const names = exchanges.map((e) => e.toLowerCase().replace(/\.$/, ""));
  const byDomain = limits.domains.get(domain.toLowerCase().replace(/\.$/, ""));
  let byHost: LimitRule | undefined;
  for (const n of names) byHost ??= limits.hosts.get(n);
  if (!byHost) {
    for (const w of limits.wildcards) {
      if (names.some((n) => n.endsWith(`.${w.suffix}`))) {
        byHost = w.rule;
        break;
      }
    }
  }
  const pick = <K extends keyof LimitRule>(k: K) =>
    byDomain && k in byDomain ? byDomain[k] : byHost && k in byHost ? byHost[k] : undefined;
  const connections = pick("connections") ?? defaults.connections;
  const rate = pick("rate");
  const chosen = rate === undefined ? defaults.rate : rate;
  return {
    connections,
    ...(chosen ? { rate: chosen } : {}),
    priority: byDomain ? 2 : byHost ? 1 : 0,
  };
}
