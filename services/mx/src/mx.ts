import type { Bus } from "@mailpipe/bus";
import { replies, SmtpError } from "@mailpipe/contracts";
import { type Directory, type DirectoryWatcher, watchDirectory } from "@mailpipe/directory";
import { createResolver, type DnsResolver, mailauthResolver, reverseName } from "@mailpipe/dns";
import {
  ContentFilter,
  createSmtpEdge,
  type EdgeHooks,
  edgeLimits,
  filterSettings,
  type SmtpEdge,
  type Transaction,
} from "@mailpipe/smtp-edge";
import type { Telemetry } from "@mailpipe/telemetry";
import type { MxConfig } from "./config.ts";
import {
  type ArcSeal,
  authenticateMessage,
  checkSpf,
  dmarcDecision,
  transactionResolver,
} from "./mail-auth.ts";
import { checkRecipient } from "./recipient-policy.ts";

export interface MxDeps {
  config: MxConfig;
  telemetry: Telemetry;
  bus: Bus;
  /** default: a resolver on DNS_SERVERS */
  resolver?: DnsResolver;
}

export interface Mx {
  edge: SmtpEdge;
  directory: DirectoryWatcher;
  readonly listening: boolean;
  /** stop taking connections, let transactions finish within `timeoutMs`, close */
  close(timeoutMs: number): Promise<void>;
}

/** What mx keeps per transaction. */
interface MxTransaction {
  resolver: ReturnType<typeof transactionResolver>;
  /** SPF at MAIL FROM, evaluated only when one of our domains refuses SPF fails at RCPT */
  spf: string | undefined;
}

/** The inbound MX (port 25): the shared SMTP edge with mx's policy as its hooks. */
export async function startMx({ config, telemetry, bus, resolver: given }: MxDeps): Promise<Mx> {
  const { log, metrics } = telemetry;
  const resolver = given ?? createResolver({ servers: config.DNS_SERVERS });
  const dns = mailauthResolver(resolver);
  const authResults = metrics.counter(
    "mx_auth_results_total",
    "SPF/DKIM/DMARC/ARC results of received messages",
    ["check", "result"],
  );
  const policyRefusals = metrics.counter(
    "mx_policy_refusals_total",
    "Messages and recipients refused by policy",
    ["reason"],
  );

  const directory = await watchDirectory(config.DIRECTORY_FILE, {
    onReload: (dir) =>
      log.info({ domains: dir.domains().length, users: dir.users().length }, "directory reloaded"),
    onError: (err) => log.error({ err: err.message }, "directory file rejected; keeping the previous one"),
  });

  const state = new WeakMap<Transaction, MxTransaction>();
  const stateOf = (tx: Transaction): MxTransaction => {
    let st = state.get(tx);
    if (!st) {
      st = { resolver: transactionResolver(dns), spf: undefined };
      state.set(tx, st);
    }
    return st;
  };
  const identity = (tx: Transaction) => ({ ip: tx.client.ip, helo: tx.client.helo, sender: tx.mailFrom });
  const senderDomain = (tx: Transaction) =>
    tx.mailFrom ? tx.mailFrom.slice(tx.mailFrom.lastIndexOf("@") + 1) : tx.client.helo || tx.client.ip;

  const hooks: EdgeHooks = {
    async mailFrom(tx) {
      const st = stateOf(tx);
      const dir = directory.current();
      // recipients are not known yet: evaluate once here if any domain may need it at RCPT
      if (dir.domains().some((d) => dir.domainPolicy(d).spfRejectAtMailFrom)) {
        st.spf = await checkSpf(identity(tx), { mta: config.MAIL_HOSTNAME, resolver: st.resolver }).catch(
          (err: Error) => {
            log.warn({ err: err.message }, "SPF evaluation failed; treating it as temperror");
            return "temperror";
          },
        );
      }
    },

    rcptTo(tx, { address }) {
      const dir = directory.current();
      const verdict = checkRecipient(dir, address);
      if (!verdict.ok) {
        policyRefusals.inc({ reason: verdict.reply.enhanced === "5.7.1" ? "relay" : "recipient" });
        log.info(
          { reply: `${verdict.reply.code} ${verdict.reply.enhanced}`, ip: tx.client.ip },
          "recipient refused",
        );
        throw new SmtpError(verdict.reply);
      }
      const domain = verdict.address.slice(verdict.address.lastIndexOf("@") + 1);
      if (stateOf(tx).spf === "fail" && dir.domainPolicy(domain).spfRejectAtMailFrom) {
        policyRefusals.inc({ reason: "spf" });
        log.info(
          { ip: tx.client.ip, senderDomain: senderDomain(tx), domain },
          "SPF hard fail: recipient refused",
        );
        throw new SmtpError(replies.spfReject(senderDomain(tx)));
      }
      return verdict.address;
    },

    async message(tx, message) {
      const st = stateOf(tx);
      const seal = arcSealFor(directory.current(), tx.recipients);
      const outcome = await authenticateMessage(message.chunks, identity(tx), {
        mta: config.MAIL_HOSTNAME,
        resolver: st.resolver,
        seal,
      });
      if (seal && !outcome.sealed) {
        log.warn(
          { domain: seal.signingDomain, arc: outcome.arc },
          "forwarded message not ARC-sealed (its ARC chain failed, or the domain's DKIM key is unusable)",
        );
      }
      authResults.inc({ check: "spf", result: outcome.spf });
      for (const r of outcome.dkim.length ? outcome.dkim : ["none"])
        authResults.inc({ check: "dkim", result: r });
      authResults.inc({ check: "dmarc", result: outcome.dmarc });
      authResults.inc({ check: "arc", result: outcome.arc });
      log.info(
        { spf: outcome.spf, dkim: outcome.dkim, dmarc: outcome.dmarc, arc: outcome.arc, ip: tx.client.ip },
        "authentication results",
      );
      const refusal = dmarcDecision(outcome);
      if (refusal) {
        const dir = directory.current();
        // one reply covers every recipient: refuse when any of their domains enforces DMARC
        const enforcing = tx.recipients.some(
          (r) => dir.domainPolicy(r.slice(r.lastIndexOf("@") + 1)).enforceDmarc,
        );
        if (enforcing) {
          policyRefusals.inc({ reason: refusal.code >= 500 ? "dmarc" : "dmarc-temperror" });
          log.info(
            { reply: `${refusal.code} ${refusal.enhanced}`, domain: outcome.dmarcPolicy?.domain },
            "DMARC says reject",
          );
          throw new SmtpError(refusal);
        }
      }
      return { prepend: [outcome.header] };
    },
  };

  // rspamd before the end-of-DATA reply, when RSPAMD_URL is set; the verdict may mark the message
  const filterOptions = filterSettings(config, { modify: true });
  const filter = filterOptions ? new ContentFilter(filterOptions, telemetry) : undefined;
  if (filter)
    log.info({ url: filter.client.url.origin, failMode: filterOptions?.failMode }, "content filter: rspamd");

  let edge: SmtpEdge | undefined;
  try {
    edge = await createSmtpEdge({
      service: "mx",
      hostname: config.MAIL_HOSTNAME,
      telemetry,
      bus,
      hooks,
      host: config.MX_HOST,
      port: config.MX_PORT,
      tls:
        config.TLS_CERT_FILE && config.TLS_KEY_FILE
          ? { certFile: config.TLS_CERT_FILE, keyFile: config.TLS_KEY_FILE }
          : undefined,
      ...edgeLimits(config),
      useProxy: config.MX_PROXY_PROTOCOL,
      reverseLookup: async (ip) => {
        const answer = await resolver.query(reverseName(ip), "PTR");
        return answer.answers.flatMap((r) => (r.type === "PTR" ? [r.target] : []));
      },
      maxRecipients: config.MAX_RECIPIENTS,
      filter,
    });
    await edge.listen();
  } catch (err) {
    await edge?.close({ timeoutMs: 0 });
    filter?.close();
    directory.close();
    throw err;
  }
  const listener = edge;

  return {
    edge: listener,
    directory,
    get listening() {
      return listener.listening;
    },
    async close(timeoutMs) {
      await listener.close({ timeoutMs });
      filter?.close();
      directory.close();
    },
  };
}

/**
 * Mail that one of our aliases forwards to another domain is ARC-sealed with the alias domain's DKIM
 * key, so the receiver can trust our Authentication-Results when SPF or DKIM no longer pass there.
 * Nothing to seal when no recipient forwards, or its domain has no key.
 */
export function arcSealFor(dir: Directory, recipients: readonly string[]): ArcSeal | undefined {
  for (const r of recipients) {
    if (dir.resolve(r).remote.length === 0) continue;
    const domain = r.slice(r.lastIndexOf("@") + 1).toLowerCase();
    const key = dir.dkim(domain);
    if (key) return { signingDomain: domain, selector: key.selector, privateKey: key.privateKey };
  }
  return undefined;
}
