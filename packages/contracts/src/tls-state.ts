// What delivery keeps in Redis about outbound TLS, and mailctl reads: the MTA-STS policy cache and
// the TLS-RPT counts per day. One definition of the keys and their shape, for both sides.

/** An MTA-STS policy as cached (JSON at `mta-sts:policy:<domain>`, expiring at its max_age). */
export interface StsPolicy {
  domain: string;
  /** the TXT record's id this policy was fetched for */
  id: string;
  mode: "enforce" | "testing" | "none";
  mx: string[];
  maxAge: number;
  fetchedAt: string;
  expiresAt: string;
  /** the policy text as served (TLS-RPT reports it as policy-string) */
  text: string;
}

export type TlsPolicyType = "sts" | "tlsa";

/** The policy a result was counted under, as the TLS report names it. */
export interface ReportPolicy {
  type: TlsPolicyType;
  /** sts: the policy text's lines; tlsa: the records in presentation form */
  strings: string[];
  mxHosts: string[];
}

export interface FailureCount {
  policy: TlsPolicyType;
  resultType: string;
  mxHost: string;
  ip: string;
  count: number;
}

export interface DayResults {
  day: string;
  domain: string;
  policies: Partial<Record<TlsPolicyType, ReportPolicy>>;
  successes: Partial<Record<TlsPolicyType, number>>;
  failures: FailureCount[];
}

export const tlsKeys = {
  stsPolicy: (domain: string) => `mta-sts:policy:${domain}`,
  stsFailure: (domain: string) => `mta-sts:failure:${domain}`,
  /** SET NX claim: the one replica refreshing the domain's cached policy ahead of its expiry */
  stsRefresh: (domain: string) => `mta-sts:refresh:${domain}`,
  /** hash: `policy\t<type>` → ReportPolicy JSON, `ok\t<type>` → n, `fail\t<type>\t<result>\t<mx>\t<ip>` → n */
  reportDay: (day: string, domain: string) => `tlsrpt:${day}:${domain}`,
  reportDomains: (day: string) => `tlsrpt:${day}:domains`,
  reportSent: (day: string, domain: string) => `tlsrpt:${day}:${domain}:sent`,
} as const;

/** The UTC day of `d`, as the report keys use it. */
export const tlsDayOf = (d: Date) => d.toISOString().slice(0, 10);

/** A `tlsKeys.reportDay` hash as counts. */
export function parseDayResults(day: string, domain: string, h: Record<string, string>): DayResults {
  const out: DayResults = { day, domain, policies: {}, successes: {}, failures: [] };
  for (const [field, value] of Object.entries(h)) {
    const [kind, type, resultType = "", mxHost = "", ip = ""] = field.split("\t") as [
      string,
      TlsPolicyType,
      string?,
      string?,
      string?,
    ];
    if (kind === "policy") out.policies[type] = JSON.parse(value) as ReportPolicy;
    else if (kind === "ok") out.successes[type] = Number(value);
    else if (kind === "fail")
      out.failures.push({ policy: type, resultType, mxHost, ip, count: Number(value) });
  }
  out.failures.sort((a, b) => b.count - a.count || a.mxHost.localeCompare(b.mxHost));
  return out;
}
