// MTA-STS (RFC 8461): the domain's policy, discovered through `_mta-sts.<domain>` TXT on the DNS
// servers this service is configured with (DNS_SERVERS), fetched over HTTPS from
// `mta-sts.<domain>/.well-known/mta-sts.txt` with certificate verification, bounded in size and
// time, and cached in Redis until its max_age, so every delivery replica shares one fetch.
//
// A cached policy is refreshed ahead of its expiry (RFC 8461 recommends it, so a policy host that is
// down for a while does not cost the domain its enforcement): once it is older than half its
// max_age or MTA_STS_REFRESH_AFTER, whichever is shorter, the next message that uses it starts a
// fetch in the background (it does not wait for it), claimed in Redis so one replica fetches per
// domain. A refresh that fails leaves the cached policy in force until its own expiry.
//
// mailauth parses the TXT record and the policy and matches MX names (mx-connect uses the same
// code); the HTTPS fetch is ours because mailauth's has no way to add a CA (a private one, or the
// tests') and always connects to port 443, and mx-connect's MTA-STS step resolves and connects on
// its own, which delivery leaves to the router's addresses.
import https from "node:https";
import net from "node:net";
import { type StsPolicy, tlsKeys } from "@mailpipe/contracts";
import { type DnsResolver, mailauthResolver } from "@mailpipe/dns";
import type { Logger } from "@mailpipe/telemetry";
import type { Redis } from "ioredis";
import { parsePolicy, resolvePolicy } from "mailauth/lib/mta-sts.js";
import type { TlsRptFailure } from "./tls-check.ts";

/** RFC 8461 3.3: policy bodies up to 64 KiB. */
export const MAX_POLICY_BYTES = 64 * 1024;
/** RFC 8461 3.2: max_age at most one year. */
const MAX_AGE_LIMIT_SEC = 31_557_600;
/** A failed fetch is not retried for the same policy id before this (each message would otherwise wait for it). */
const FAILURE_HOLD_MS = 5 * 60_000;
/** How long a process trusts its own copy of a domain's Redis entry while the TXT id stays the same. */
const MEMO_MS = 60_000;
const MEMO_MAX = 10_000;
/** A TXT lookup that failed (timeout, SERVFAIL) is not repeated for this long, per domain and process. */
const DNS_FAILURE_HOLD_MS = 60_000;
const key = tlsKeys.stsPolicy;
const failureKey = tlsKeys.stsFailure;
const refreshKey = tlsKeys.stsRefresh;

export type { StsPolicy };

export interface StsFailure {
  id: string;
  type: Extract<TlsRptFailure, "sts-policy-fetch-error" | "sts-policy-invalid" | "sts-webpki-invalid">;
  detail: string;
  at: string;
}

/** What applies to the destination now: a policy, or none (with why, when a fetch failed). */
export interface StsLookup {
  policy?: StsPolicy;
  failure?: StsFailure;
}

export interface MtaStsOptions {
  redis: Redis;
  resolver: DnsResolver;
  log: Logger;
  /** CAs the policy host's certificate may chain to (undefined: Node's roots) */
  ca?: string[] | undefined;
  /** MTA_STS_PORT: 443; tests use another */
  port: number;
  /** MTA_STS_FETCH_TIMEOUT, the whole request */
  timeoutMs: number;
  /** SMTP_BLOCK_LOCAL_ADDRESSES: a policy host on a private address is not fetched from either */
  blockLocalAddresses: boolean;
  /**
   * MTA_STS_REFRESH_AFTER: a cached policy older than this (or than half its max_age, if shorter)
   * is fetched again in the background when used
   */
  refreshAfterMs: number;
}

class FetchError extends Error {
  readonly type: StsFailure["type"];
  constructor(type: StsFailure["type"], message: string) {
    super(message);
    this.type = type;
  }
}

const PRIVATE = [
  /^127\./,
  /^10\./,
  /^192\.168\./,
  /^172\.(1[6-9]|2\d|3[01])\./,
  /^169\.254\./,
  /^0\./,
  /^::1$/,
  /^f[cd]/i,
  /^fe80:/i,
];

export class MtaSts {
  readonly #o: MtaStsOptions;
  readonly #resolve: ReturnType<typeof mailauthResolver>;
  /** domain → until when its TXT lookup is not retried (a DNS outage must not cost every message a timeout) */
  readonly #dnsFailed = new Map<string, number>();
  /** domain → the policy this process last read from (or wrote to) Redis, none included */
  readonly #memo = new Map<string, { policy?: StsPolicy; until: number }>();
  /** domain → until when this process starts no refresh of it (one is running, claimed or failed) */
  readonly #refreshHeld = new Map<string, number>();
  /** refreshes running in this process, awaited by close() */
  readonly #refreshing = new Set<Promise<void>>();

  constructor(o: MtaStsOptions) {
    this.#o = o;
    this.#resolve = mailauthResolver(o.resolver);
  }

  /** The cached policy, whatever the DNS says now (mailctl). */
  async cached(domain: string): Promise<StsPolicy | undefined> {
    const raw = await this.#o.redis.get(key(domain.toLowerCase()));
    return raw ? (JSON.parse(raw) as StsPolicy) : undefined;
  }

  /**
   * The policy for `domain`: the cached one while its TXT id is unchanged (or the TXT cannot be
   * read: RFC 8461 5.1 keeps a cached policy until it expires), else a fresh fetch. Never throws.
   */
  async lookup(rawDomain: string): Promise<StsLookup> {
    const domain = rawDomain.toLowerCase().replace(/\.$/, "");
    const { redis, log } = this.#o;
    let id: string | false | undefined;
    const failedUntil = this.#dnsFailed.get(domain);
    if (failedUntil === undefined || failedUntil <= Date.now()) {
      try {
        id = await resolvePolicy(domain, { resolver: this.#resolve as never });
        this.#dnsFailed.delete(domain);
      } catch (err) {
        // a DNS failure (or several STS records): the cached policy, if any, still applies
        log.info({ domain, err: (err as Error).message }, "MTA-STS: TXT lookup failed");
        if (this.#dnsFailed.size >= MEMO_MAX) this.#dnsFailed.clear();
        this.#dnsFailed.set(domain, Date.now() + DNS_FAILURE_HOLD_MS);
      }
    }
    // what this process last read from Redis: with an unchanged id (or no TXT to compare), no
    // Redis round trip per message
    const memo = this.#memo.get(domain);
    const now = Date.now();
    const live = (p: StsPolicy | undefined) => (p && Date.parse(p.expiresAt) > now ? p : undefined);
    let cached: StsPolicy | undefined;
    if (memo && memo.until > now && (!id || memo.policy?.id === id)) {
      cached = live(memo.policy);
    } else {
      try {
        cached = live(await this.cached(domain));
        if (this.#memo.size >= MEMO_MAX) this.#memo.clear();
        this.#memo.set(domain, { ...(cached ? { policy: cached } : {}), until: now + MEMO_MS });
      } catch (err) {
        log.warn({ err: (err as Error).message, domain }, "MTA-STS: cannot read the policy cache in Redis");
      }
    }
    if (!id) return cached ? { policy: cached } : {};
    if (cached && cached.id === id) {
      this.#refreshIfDue(domain, cached);
      return { policy: cached };
    }
    const held = await redis.get(failureKey(domain)).catch(() => null);
    if (held) {
      const failure = JSON.parse(held) as StsFailure;
      if (failure.id === id) return cached ? { policy: cached, failure } : { failure };
    }
    try {
      const policy = await this.#fetchAndCache(domain, id);
      log.info(
        { domain, id, mode: policy.mode, mx: policy.mx, maxAge: policy.maxAge },
        "MTA-STS policy fetched",
      );
      return { policy };
    } catch (err) {
      const failure = await this.#recordFailure(domain, id, err as Error);
      log.warn(
        { domain, id, failure: failure.type, err: failure.detail },
        cached
          ? "MTA-STS: policy fetch failed; the cached policy still applies"
          : "MTA-STS: policy fetch failed; no policy applies",
      );
      return cached ? { policy: cached, failure } : { failure };
    }
  }

  /** Waits for the background refreshes this process started (shutdown). */
  async close(): Promise<void> {
    await Promise.allSettled([...this.#refreshing]);
  }

  async #fetchAndCache(domain: string, id: string): Promise<StsPolicy> {
    const policy = await this.#fetch(domain, id);
    const ttlMs = Math.max(1, policy.maxAge) * 1000;
    await this.#o.redis.set(key(domain), JSON.stringify(policy), "PX", ttlMs).catch((err: Error) => {
      this.#o.log.warn({ err: err.message, domain }, "MTA-STS: could not cache the policy in Redis");
    });
    this.#memo.set(domain, { policy, until: Date.now() + MEMO_MS });
    return policy;
  }

  /** Keeps a failed fetch for FAILURE_HOLD_MS (mailctl tls shows it; the same id is not retried meanwhile). */
  async #recordFailure(domain: string, id: string, err: Error): Promise<StsFailure> {
    const type = err instanceof FetchError ? err.type : "sts-policy-fetch-error";
    const failure: StsFailure = { id, type, detail: err.message, at: new Date().toISOString() };
    await this.#o.redis
      .set(failureKey(domain), JSON.stringify(failure), "PX", FAILURE_HOLD_MS)
      .catch(() => undefined);
    return failure;
  }

  /** Starts a background refresh of `cached` when it is due and no one else is on it. */
  #refreshIfDue(domain: string, cached: StsPolicy): void {
    const now = Date.now();
    const dueAt = Date.parse(cached.fetchedAt) + Math.min(cached.maxAge * 500, this.#o.refreshAfterMs);
    if (now < dueAt || (this.#refreshHeld.get(domain) ?? 0) > now) return;
    if (this.#refreshHeld.size >= MEMO_MAX) this.#refreshHeld.clear();
    // this process asks again only after the claim would have lapsed
    this.#refreshHeld.set(domain, now + this.#claimMs());
    const running: Promise<void> = this.#refresh(domain, cached).finally(() =>
      this.#refreshing.delete(running),
    );
    this.#refreshing.add(running);
  }

  /** Longer than any fetch; also how long a failed refresh is not tried again. */
  #claimMs(): number {
    return Math.max(FAILURE_HOLD_MS, 2 * this.#o.timeoutMs);
  }

  async #refresh(domain: string, cached: StsPolicy): Promise<void> {
    const { redis, log } = this.#o;
    // one replica per domain; the claim is left to lapse, so neither a replica still holding the
    // old policy in memory nor a failed host is asked again before then
    const claimed = await redis
      .set(refreshKey(domain), "1", "PX", this.#claimMs(), "NX")
      .catch((err: Error) => {
        log.warn(
          { err: err.message, domain },
          "MTA-STS: cannot claim the policy refresh in Redis; not refreshing now",
        );
        return null;
      });
    if (claimed !== "OK") return;
    try {
      const policy = await this.#fetchAndCache(domain, cached.id);
      log.info(
        { domain, id: policy.id, mode: policy.mode, mx: policy.mx, maxAge: policy.maxAge },
        "MTA-STS policy refreshed before its expiry",
      );
    } catch (err) {
      const failure = await this.#recordFailure(domain, cached.id, err as Error);
      log.warn(
        { domain, id: cached.id, failure: failure.type, err: failure.detail, expiresAt: cached.expiresAt },
        "MTA-STS: refreshing the cached policy failed; it still applies until it expires, and the refresh is tried again later",
      );
    }
  }

  async #fetch(domain: string, id: string): Promise<StsPolicy> {
    const host = `mta-sts.${domain}`;
    const address = await this.#address(host);
    const text = await this.#get(host, address);
    let parsed: ReturnType<typeof parsePolicy>;
    try {
      parsed = parsePolicy(text);
    } catch (err) {
      throw new FetchError(
        "sts-policy-invalid",
        `invalid policy from https://${host}: ${(err as Error).message}`,
      );
    }
    const maxAge = Math.min(parsed.maxAge ?? 0, MAX_AGE_LIMIT_SEC);
    const now = Date.now();
    return {
      domain,
      id,
      mode: parsed.mode,
      mx: parsed.mx ?? [],
      maxAge,
      fetchedAt: new Date(now).toISOString(),
      expiresAt: new Date(now + maxAge * 1000).toISOString(),
      text,
    };
  }

  async #address(host: string): Promise<string> {
    let addresses: string[] = [];
    try {
      const a = await this.#o.resolver.a(host);
      if (a.kind === "records") addresses = a.records.map((r) => r.address);
      if (addresses.length === 0) {
        const aaaa = await this.#o.resolver.aaaa(host);
        if (aaaa.kind === "records") addresses = aaaa.records.map((r) => r.address);
      }
    } catch (err) {
      throw new FetchError("sts-policy-fetch-error", `cannot resolve ${host}: ${(err as Error).message}`);
    }
    const usable = addresses.filter(
      (ip) => !this.#o.blockLocalAddresses || !PRIVATE.some((re) => re.test(ip)),
    );
    if (usable.length === 0) {
      throw new FetchError(
        "sts-policy-fetch-error",
        addresses.length
          ? `${host} has only private addresses (SMTP_BLOCK_LOCAL_ADDRESSES)`
          : `${host} has no address`,
      );
    }
    return usable[0]!;
  }

  /** GET /.well-known/mta-sts.txt: 200, text/plain, at most 64 KiB, within the timeout, no redirects. */
  #get(host: string, address: string): Promise<string> {
    const { ca, port, timeoutMs } = this.#o;
    return new Promise<string>((resolve, reject) => {
      let settled = false;
      const finish = (err: Error | undefined, text?: string) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) {
          req.destroy();
          reject(err);
        } else resolve(text ?? "");
      };
      const req = https.request(
        {
          host: address,
          family: net.isIPv6(address) ? 6 : 4,
          port,
          path: "/.well-known/mta-sts.txt",
          method: "GET",
          servername: host,
          headers: { host, "user-agent": "mailpipe-delivery" },
          rejectUnauthorized: true,
          ...(ca ? { ca } : {}),
          agent: false,
          timeout: timeoutMs,
        },
        (res) => {
          if (res.statusCode !== 200) {
            finish(new FetchError("sts-policy-fetch-error", `https://${host}: HTTP ${res.statusCode}`));
            return;
          }
          const type = (res.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
          if (type !== "text/plain") {
            finish(
              new FetchError(
                "sts-policy-invalid",
                `https://${host}: Content-Type ${type || "(none)"}, not text/plain`,
              ),
            );
            return;
          }
          const chunks: Buffer[] = [];
          let size = 0;
          res.on("data", (chunk: Buffer) => {
            size += chunk.length;
            if (size > MAX_POLICY_BYTES) {
              finish(
                new FetchError(
                  "sts-policy-invalid",
                  `https://${host}: policy larger than ${MAX_POLICY_BYTES} bytes`,
                ),
              );
            } else chunks.push(chunk);
          });
          res.on("end", () => finish(undefined, Buffer.concat(chunks).toString("utf8")));
          res.on("error", (err) => finish(new FetchError("sts-policy-fetch-error", err.message)));
        },
      );
      const timer = setTimeout(
        () =>
          finish(
            new FetchError("sts-policy-fetch-error", `https://${host}: no policy within ${timeoutMs} ms`),
          ),
        timeoutMs,
      );
      req.on("timeout", () => finish(new FetchError("sts-policy-fetch-error", `https://${host}: timed out`)));
      req.on("error", (err: NodeJS.ErrnoException) => {
        const tlsError = /CERT|SELF_SIGNED|UNABLE_TO|altname|certificate/i.test(`${err.code} ${err.message}`);
        finish(
          new FetchError(
            tlsError ? "sts-webpki-invalid" : "sts-policy-fetch-error",
            `https://${host}: ${err.message}`,
          ),
        );
      });
      req.end();
    });
  }
}
