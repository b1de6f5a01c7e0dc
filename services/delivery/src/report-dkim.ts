// RFC 8460 3 and 5.3: a TLS report sent by mail carries a DKIM signature of the reporting domain.
// The key is the one msa signs that domain's mail with: the directory (DIRECTORY_FILE), never a
// store of its own. The reporting domain is the From's (TLSRPT_CONTACT, postmaster@MAIL_HOSTNAME by
// default); when it has no key, its parent domains are tried (postmaster@mx.example.com signs as
// example.com, which DMARC's relaxed alignment accepts). No key: the report goes out unsigned, and a
// warning says once per domain what to configure.
import { normalizeDomain, parseAddress } from "@mailpipe/contracts";
import { type Directory, type DkimKey, dkimSignOptions } from "@mailpipe/directory";
import type { Logger } from "@mailpipe/telemetry";
import { dkimSign } from "mailauth";
import addressparser from "nodemailer/lib/addressparser";

/** The report's own header fields are covered too, so the receiver can trust which domain it is about. */
const SIGNED_FIELDS = [
  "From",
  "To",
  "Subject",
  "Date",
  "Message-ID",
  "MIME-Version",
  "Content-Type",
  "TLS-Report-Domain",
  "TLS-Report-Submitter",
];

export class ReportSignError extends Error {
  override name = "ReportSignError";
}

export interface ReportSignerOptions {
  /** the directory in use, or undefined when none is loaded */
  directory: () => Directory | undefined;
  /** DIRECTORY_FILE, for the log lines */
  directoryFile: string;
  log: Logger;
}

export class ReportSigner {
  readonly #o: ReportSignerOptions;
  /** domains already warned about (again after they had a key and lost it) */
  readonly #warned = new Set<string>();

  constructor(o: ReportSignerOptions) {
    this.#o = o;
  }

  /** The key for `domain` or the nearest parent domain that has one. */
  keyFor(domain: string): { domain: string; key: DkimKey } | undefined {
    const dir = this.#o.directory();
    if (!dir) return undefined;
    const labels = domain.split(".");
    for (let i = 0; i < labels.length - 1; i++) {
      const d = labels.slice(i).join(".");
      const key = dir.dkim(d);
      if (key) return { domain: d, key };
    }
    return undefined;
  }

  /**
   * `raw` with a DKIM-Signature of the From's domain (or parent) prepended, or `raw` unchanged when
   * no key exists. A key that fails to sign throws: the report is then tried again later.
   */
  async sign(from: string, raw: Buffer): Promise<Buffer> {
    const address = addressparser(from, { flatten: true })[0]?.address ?? from;
    const fromDomain = parseAddress(address)?.domain ?? normalizeDomain(address.split("@").pop() ?? "");
    if (!fromDomain) {
      this.#warnOnce(
        `from:${from}`,
        { from },
        "TLS-RPT: the report's From (TLSRPT_CONTACT) has no domain; reports go out unsigned (RFC 8460 wants them DKIM-signed): set TLSRPT_CONTACT to an address of a domain with a DKIM key",
      );
      return raw;
    }
    const found = this.keyFor(fromDomain);
    if (!found) {
      this.#warnOnce(
        fromDomain,
        { domain: fromDomain, directoryFile: this.#o.directoryFile },
        this.#o.directory()
          ? `TLS-RPT: no DKIM key for ${fromDomain} (or a parent domain) in the directory; TLS reports go out unsigned and receivers may discard them (RFC 8460 3): give the domain a key (mailctl dkim keygen <domain>) and publish its DNS record, or set TLSRPT_CONTACT to an address of a domain that has one`
          : `TLS-RPT: no directory loaded (DIRECTORY_FILE); TLS reports go out unsigned and receivers may discard them (RFC 8460 3): mount the directory msa uses at DIRECTORY_FILE, with a DKIM key for ${fromDomain} or a parent domain`,
      );
      return raw;
    }
    this.#warned.delete(fromDomain);
    const { domain, key } = found;
    const result = await dkimSign(raw, dkimSignOptions(domain, key, SIGNED_FIELDS));
    if (!result.signatures) {
      const why = result.errors.map((e) => e.err?.message ?? String(e)).join("; ") || "no signature created";
      throw new ReportSignError(`DKIM signing for ${domain} (selector ${key.selector}) failed: ${why}`);
    }
    return Buffer.concat([Buffer.from(result.signatures), raw]);
  }

  #warnOnce(k: string, fields: Record<string, unknown>, message: string): void {
    if (this.#warned.has(k)) return;
    this.#warned.add(k);
    this.#o.log.warn(fields, message);
  }
}
