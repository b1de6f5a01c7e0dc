// Where mail for a domain goes (RFC 5321 5.1, RFC 7505): the router's one question to the DNS.
import { normalizeName } from "./client.ts";
import { DnsError, type DnsResolver } from "./types.ts";

export interface MailHost {
  exchange: string;
  /** 0 for the implicit MX. */
  priority: number;
  /** A addresses first, then AAAA. */
  addresses: string[];
  /** Seconds: the smallest of the MX record's and the addresses' TTLs. */
  ttl: number;
}

export type MailHosts =
  /** In the order to try: by preference, equal preferences shuffled on every call. */
  | { kind: "hosts"; hosts: MailHost[] }
  /** RFC 7505: the domain accepts no mail (permanent). */
  | { kind: "nullmx" }
  /** The domain does not exist (permanent). */
  | { kind: "nxdomain" }
  /** No MX and no A/AAAA, or no MX host has an address (permanent). */
  | { kind: "none" }
  /** A lookup failed temporarily and nothing usable was found: defer. */
  | { kind: "temp"; error: DnsError };

type Addresses =
  | { kind: "found"; addresses: string[]; ttl: number }
  | { kind: "none" }
  | { kind: "temp"; error: DnsError };

/** A then AAAA of one host. Addresses from one family are enough when the other fails. */
async function addressesOf(resolver: DnsResolver, host: string): Promise<Addresses> {
  const lookups = await Promise.allSettled([resolver.a(host), resolver.aaaa(host)]);
  const addresses: string[] = [];
  let ttl = Number.POSITIVE_INFINITY;
  let error: DnsError | undefined;
  for (const lookup of lookups) {
    if (lookup.status === "rejected") {
      if (!(lookup.reason instanceof DnsError)) throw lookup.reason;
      error ??= lookup.reason;
    } else if (lookup.value.kind === "records") {
      addresses.push(...lookup.value.records.map((r) => r.address));
      ttl = Math.min(ttl, lookup.value.ttl);
    }
  }
  if (addresses.length > 0) return { kind: "found", addresses, ttl };
  return error ? { kind: "temp", error } : { kind: "none" };
}

/** Fisher-Yates shuffle in place. */
function shuffle<T>(items: T[]): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [items[i], items[j]] = [items[j]!, items[i]!];
  }
  return items;
}

/**
 * Resolves the hosts that receive mail for `domain`:
 * - MX records in preference order, equal preferences in random order (RFC 5321 5.1), each with its
 *   A then AAAA addresses; a host whose address lookups fail permanently is skipped, one that fails
 *   temporarily is left out when others work, and makes the result `temp` when none does;
 * - a lone MX "." (RFC 7505 null MX; any MX set made only of ".") is `nullmx`;
 * - no MX records (NODATA): the implicit MX, the domain itself with its A/AAAA, else `none`;
 * - NXDOMAIN is `nxdomain`; a temporary failure of the MX lookup itself is `temp`.
 */
export async function resolveMailHosts(resolver: DnsResolver, domain: string): Promise<MailHosts> {
  let mx: Awaited<ReturnType<DnsResolver["mx"]>>;
  try {
    mx = await resolver.mx(domain);
  } catch (err) {
    if (err instanceof DnsError) return { kind: "temp", error: err };
    throw err;
  }
  if (mx.kind === "nxdomain") return { kind: "nxdomain" };

  if (mx.kind === "nodata") {
    const own = await addressesOf(resolver, domain);
    if (own.kind === "temp") return { kind: "temp", error: own.error };
    if (own.kind === "none") return { kind: "none" };
    const exchange = normalizeName(domain) ?? domain;
    return { kind: "hosts", hosts: [{ exchange, priority: 0, addresses: own.addresses, ttl: own.ttl }] };
  }

  const usable = mx.records.filter((r) => r.exchange !== ".");
  if (usable.length === 0) return { kind: "nullmx" };

  // one entry per exchange, at its best preference; then sort, shuffling within each preference
  const best = new Map<string, (typeof usable)[number]>();
  for (const r of usable) {
    const seen = best.get(r.exchange);
    if (!seen || r.priority < seen.priority) best.set(r.exchange, r);
  }
  const byPriority = new Map<number, (typeof usable)[number][]>();
  for (const r of best.values()) byPriority.set(r.priority, [...(byPriority.get(r.priority) ?? []), r]);
  const ordered = [...byPriority.keys()].sort((x, y) => x - y).flatMap((p) => shuffle(byPriority.get(p)!));

  const resolved = await Promise.all(ordered.map((r) => addressesOf(resolver, r.exchange)));
  const hosts: MailHost[] = [];
  let error: DnsError | undefined;
  ordered.forEach((r, i) => {
    const found = resolved[i]!;
    if (found.kind === "found") {
      hosts.push({
        exchange: r.exchange,
        priority: r.priority,
        addresses: found.addresses,
        ttl: Math.min(r.ttl, found.ttl),
      });
    } else if (found.kind === "temp") {
      error ??= found.error;
    }
  });
  if (hosts.length > 0) return { kind: "hosts", hosts };
  return error ? { kind: "temp", error } : { kind: "none" };
}
