// DANE for SMTP (RFC 7672): the TLSA records of an MX host, trusted only when a validating resolver
// (DANE_RESOLVERS, which the operator vouches for: a local unbound, say) sets the AD bit on the
// answer. No stub resolver can check DNSSEC itself; the AD bit of any other server means nothing.
// Certificates are matched against the records by mx-connect's verifier (tls-check.ts).

import { replies } from "@mailpipe/contracts";
import { DnsError, type DnsResolver } from "@mailpipe/dns";
import type { Logger } from "@mailpipe/telemetry";
import { SmtpFailure } from "./smtp-session.ts";
import type { TlsaRecord } from "./tls-check.ts";

export interface DaneOptions {
  /** the validating resolvers (DANE_RESOLVERS) */
  resolver: DnsResolver;
  /** SMTP_REMOTE_PORT: TLSA records live at `_<port>._tcp.<mx host>` (25 in production) */
  port: number;
  log: Logger;
}

export type DaneLookup =
  /** records: usable DANE-TA/DANE-EE records (empty: no DANE for this host) */
  { records: TlsaRecord[]; encryptOnly?: boolean } | { failure: SmtpFailure };

/** RFC 7672 3.1: only DANE-TA(2) and DANE-EE(3), with known selectors and matching types, are usable. */
const usable = (r: TlsaRecord) => (r.usage === 2 || r.usage === 3) && r.selector <= 1 && r.matchingType <= 2;

export class Dane {
  readonly #o: DaneOptions;

  constructor(o: DaneOptions) {
    this.#o = o;
  }

  async lookup(rawExchange: string): Promise<DaneLookup> {
    const exchange = rawExchange.toLowerCase().replace(/\.$/, "");
    const { resolver, port } = this.#o;
    try {
      // RFC 7672 2.2.2: TLSA records are looked up only for a host whose address records are secure
      const address = await resolver.query(exchange, "A");
      if (!address.authenticated) return { records: [] };
      const tlsa = await resolver.query(`_${port}._tcp.${exchange}`, "TLSA");
      if (!tlsa.authenticated) return { records: [] };
      const records: TlsaRecord[] = tlsa.answers.map((r) => ({
        usage: r.usage,
        selector: r.selector,
        matchingType: r.matchingType,
        data: r.data,
      }));
      const good = records.filter(usable);
      if (good.length > 0) return { records: good };
      // RFC 7672 2.2: secure TLSA records, none usable: TLS is still mandatory, without authentication
      return records.length > 0 ? { records: [], encryptOnly: true } : { records: [] };
    } catch (err) {
      // a validating resolver answers SERVFAIL for a bogus answer: never fall back to less (RFC 7672 2.2)
      const detail = err instanceof DnsError ? `${err.code} from ${err.server}` : (err as Error).message;
      this.#o.log.warn({ mx: exchange, err: detail }, "DANE: TLSA lookup failed; deferring");
      return { failure: new SmtpFailure("policy", "connect", replies.daneLookupFailed(exchange, detail)) };
    }
  }
}
