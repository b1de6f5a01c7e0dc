import { Readable } from "node:stream";
import { type DkimKey, dkimSignOptions } from "@mailpipe/directory";
import type { Logger, Metrics } from "@mailpipe/telemetry";
import { dkimSign } from "mailauth";

export class DkimSignError extends Error {
  override name = "DkimSignError";
}

export interface DkimSignerOptions {
  log: Logger;
  metrics: Metrics;
}

/**
 * DKIM-signs submitted mail for the author (header From) domain with its key from the directory:
 * relaxed/relaxed, rsa-sha256 or ed25519-sha256 as the key says. A domain without a key sends
 * unsigned (logged once per domain); a key that fails to sign is an error, because mail from a
 * domain that publishes DKIM and DMARC would otherwise go out unsigned and be rejected downstream.
 */
export class DkimSigner {
  readonly #log: Logger;
  readonly #counter;
  readonly #unsignedDomains = new Set<string>();

  constructor({ log, metrics }: DkimSignerOptions) {
    this.#log = log;
    this.#counter = metrics.counter("msa_dkim_signed_total", "Submitted messages by DKIM signing result", [
      "result",
    ]);
  }

  /**
   * The DKIM-Signature field (CRLF-terminated) for `message` (the header fields and body exactly as
   * they will be stored, minus the signature), or "" when the domain has no key.
   */
  async sign(domain: string, key: DkimKey | undefined, message: readonly Buffer[]): Promise<string> {
    if (!key) {
      if (!this.#unsignedDomains.has(domain)) {
        this.#unsignedDomains.add(domain);
        this.#log.info(
          { domain },
          "no DKIM key for this domain in the directory; its mail goes out unsigned",
        );
      }
      this.#counter.inc({ result: "unsigned" });
      return "";
    }
    const result = await dkimSign(Readable.from(message), dkimSignOptions(domain, key));
    if (!result.signatures) {
      const why = result.errors.map((e) => e.err?.message ?? String(e)).join("; ") || "no signature created";
      throw new DkimSignError(`DKIM signing for ${domain} (selector ${key.selector}) failed: ${why}`);
    }
    this.#unsignedDomains.delete(domain);
    this.#counter.inc({ result: "signed" });
    return result.signatures;
  }
}
