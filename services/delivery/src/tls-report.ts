// TLS-RPT (RFC 8460): every new session to a destination with a policy (MTA-STS or DANE) is counted
// per UTC day in Redis (shared by every replica): successes, and failures by result type, MX host
// and address. Once a day the previous day's aggregate goes, as gzip JSON, to the `rua` mailto of
// the domain's `_smtp._tls` TXT record, as a message published to mail.v1.queued (source "report")
// like the router publishes DSNs: the router routes it and delivery sends it, with retries, like
// any other mail. An https rua is logged as unsupported. The report is DKIM-signed for the From's
// domain with its key from the directory (report-dkim.ts), as RFC 8460 3 asks.
import { createHash, randomUUID } from "node:crypto";
import { promisify } from "node:util";
import { gzip as gzipCb } from "node:zlib";
import type { Bus } from "@mailpipe/bus";
import {
  type DayResults,
  newQueueId,
  parseDayResults,
  QueuedMail,
  type ReportPolicy,
  subjects,
  type TlsPolicyType,
  tlsDayOf,
  tlsKeys,
} from "@mailpipe/contracts";
import type { DnsResolver } from "@mailpipe/dns";
import type { Logger } from "@mailpipe/telemetry";
import type { Redis } from "ioredis";
import MimeNode from "nodemailer/lib/mime-node";
import type { ReportSigner } from "./report-dkim.ts";
import type { TlsResult } from "./tls-check.ts";

const gzip = promisify(gzipCb);

/** Days a day's counts are kept: the report is sent the next day, mailctl shows the last week. */
const KEEP_SEC = 8 * 86_400;
/** failure-details rows per policy in one report (the rest are summed into the counts only) */
const MAX_FAILURE_ROWS = 1000;

export type PolicyType = TlsPolicyType;
export type { ReportPolicy };

export const dayOf = tlsDayOf;
const dayKey = tlsKeys.reportDay;
const domainsKey = tlsKeys.reportDomains;
const sentKey = tlsKeys.reportSent;

export class TlsReportStore {
  readonly #redis: Redis;
  readonly #log: Logger;

  constructor(redis: Redis, log: Logger) {
    this.#redis = redis;
    this.#log = log;
  }

  /** Counts one session's result; fire and forget (a lost count never holds up mail). */
  record(
    domain: string,
    policy: ReportPolicy,
    mxHost: string,
    ip: string,
    result: TlsResult,
    now = new Date(),
  ): void {
    const day = dayOf(now);
    const k = dayKey(day, domain.toLowerCase());
    const field = result.failure
      ? `fail\t${policy.type}\t${result.failure}\t${mxHost.toLowerCase()}\t${ip}`
      : `ok\t${policy.type}`;
    this.#redis
      .multi()
      .hset(k, `policy\t${policy.type}`, JSON.stringify(policy))
      .hincrby(k, field, 1)
      .expire(k, KEEP_SEC)
      .sadd(domainsKey(day), domain.toLowerCase())
      .expire(domainsKey(day), KEEP_SEC)
      .exec()
      .catch((err: Error) =>
        this.#log.warn({ err: err.message, domain }, "TLS-RPT: could not count a result"),
      );
  }

  async domains(day: string): Promise<string[]> {
    return (await this.#redis.smembers(domainsKey(day))).sort();
  }

  async results(day: string, domain: string): Promise<DayResults> {
    const d = domain.toLowerCase();
    return parseDayResults(day, d, await this.#redis.hgetall(dayKey(day, d)));
  }

  /** True once per (day, domain) across every replica: the one that gets it sends the report. */
  async claim(day: string, domain: string): Promise<boolean> {
    return (await this.#redis.set(sentKey(day, domain), "1", "EX", KEEP_SEC, "NX")) === "OK";
  }

  /** Gives the claim back after a failed send, so a later run tries again. */
  async unclaim(day: string, domain: string): Promise<void> {
    await this.#redis.del(sentKey(day, domain));
  }
}

/** The RFC 8460 4.4 report for one domain and day. */
export function buildReport(r: DayResults, o: { organization: string; contact: string; reportId: string }) {
  const policies = (Object.keys(r.policies) as PolicyType[]).map((type) => {
    const p = r.policies[type]!;
    const failures = r.failures.filter((f) => f.policy === type);
    return {
      policy: {
        "policy-type": type,
        "policy-string": p.strings,
        "policy-domain": r.domain,
        ...(p.mxHosts.length ? { "mx-host": p.mxHosts } : {}),
      },
      summary: {
        "total-successful-session-count": r.successes[type] ?? 0,
        "total-failure-session-count": failures.reduce((n, f) => n + f.count, 0),
      },
      ...(failures.length
        ? {
            "failure-details": failures.slice(0, MAX_FAILURE_ROWS).map((f) => ({
              "result-type": f.resultType,
              // a policy that could not be fetched failed before any MX was chosen
              ...(f.mxHost ? { "receiving-mx-hostname": f.mxHost } : {}),
              ...(f.ip ? { "receiving-ip": f.ip } : {}),
              "failed-session-count": f.count,
            })),
          }
        : {}),
    };
  });
  return {
    "organization-name": o.organization,
    "date-range": { "start-datetime": `${r.day}T00:00:00Z`, "end-datetime": `${r.day}T23:59:59Z` },
    "contact-info": o.contact,
    "report-id": o.reportId,
    policies,
  };
}

/** `v=TLSRPTv1; rua=mailto:a@b,https://…` → its rua URIs, or undefined without a usable record. */
export function parseTlsRptRecord(txt: string[][]): string[] | undefined {
  const records = txt.map((strings) => strings.join("")).filter((t) => /^v=TLSRPTv1\s*(;|$)/.test(t));
  if (records.length !== 1) return undefined;
  const rua = /(?:^|;)\s*rua=([^;]*)/.exec(records[0]!)?.[1];
  return rua
    ?.split(",")
    .map((u) => u.trim())
    .filter(Boolean);
}

export interface ReportSenderOptions {
  store: TlsReportStore;
  resolver: DnsResolver;
  bus: Pick<Bus, "publish" | "emit">;
  log: Logger;
  /** MAIL_HOSTNAME: the submitter */
  hostname: string;
  /** TLSRPT_ORGANIZATION */
  organization: string;
  /** TLSRPT_CONTACT, also the report's From */
  contact: string;
  /** DKIM-signs the report for the From's domain (none: unsigned) */
  signer?: ReportSigner | undefined;
}

/** Sends the reports of `day` for every domain counted that day; returns the queue ids published. */
export async function sendDailyReports(o: ReportSenderOptions, day: string): Promise<string[]> {
  const sent: string[] = [];
  for (const domain of await o.store.domains(day)) {
    if (!(await o.store.claim(day, domain))) continue;
    try {
      const queueId = await sendOne(o, day, domain);
      if (queueId) sent.push(queueId);
    } catch (err) {
      await o.store.unclaim(day, domain).catch(() => undefined);
      o.log.warn(
        { err: (err as Error).message, domain, day },
        "TLS-RPT: report not sent; trying again later",
      );
    }
  }
  return sent;
}

async function sendOne(o: ReportSenderOptions, day: string, domain: string): Promise<string | undefined> {
  const txt = await o.resolver.txt(`_smtp._tls.${domain}`);
  const rua = txt.kind === "records" ? parseTlsRptRecord(txt.records) : undefined;
  if (!rua) return undefined; // the domain asks for no reports
  const mailto = rua
    .filter((u) => /^mailto:/i.test(u))
    .map((u) => decodeURIComponent(u.slice(7).split("?")[0]!));
  for (const u of rua.filter((x) => !/^mailto:/i.test(x))) {
    o.log.info({ domain, rua: u }, "TLS-RPT: only mailto rua is supported; not sending there");
  }
  if (mailto.length === 0) return undefined;
  const results = await o.store.results(day, domain);
  const reportId = `${day}.${domain}.${randomUUID()}@${o.hostname}`;
  const report = buildReport(results, { organization: o.organization, contact: o.contact, reportId });
  const gz = await gzip(Buffer.from(JSON.stringify(report)));
  const queueId = newQueueId();
  const unsigned = await composeReport({ ...o, domain, day, to: mailto, gz, reportId, queueId });
  const raw = o.signer ? await o.signer.sign(o.contact, unsigned) : unsigned;
  const mail: QueuedMail = {
    v: 1,
    queueId,
    source: "report",
    receivedAt: new Date().toISOString(),
    // the null sender: a report that cannot be delivered bounces to no one (RFC 8460 leaves it open)
    envelope: {
      mailFrom: "",
      rcptTo: mailto.map((address) => ({ address })),
      smtputf8: false,
      bodyType: "7BIT",
    },
    body: {
      attached: true,
      size: raw.length,
      sha256: createHash("sha256").update(raw).digest("hex"),
    },
    messageId: `<${queueId}@${o.hostname}>`,
  };
  await o.bus.publish(subjects.queued(), QueuedMail, mail, {
    msgId: `tlsrpt:${day}:${domain}`,
    attachment: raw,
  });
  o.bus.emit({ type: "queued", queueId, recipients: mailto, detail: `TLS report for ${domain}, ${day}` });
  o.log.info({ domain, day, to: mailto, queueId }, "TLS-RPT: report queued");
  return queueId;
}

async function composeReport(a: {
  hostname: string;
  contact: string;
  domain: string;
  day: string;
  to: string[];
  gz: Buffer;
  reportId: string;
  queueId: string;
}): Promise<Buffer> {
  const begin = Date.parse(`${a.day}T00:00:00Z`) / 1000;
  const end = begin + 86_399;
  // RFC 8460 5.1: submitter!policy-domain!begin!end!unique-id.json.gz
  const filename = `${a.hostname}!${a.domain}!${begin}!${end}!${a.queueId}.json.gz`;
  const root = new MimeNode('multipart/report; report-type="tlsrpt"');
  root.setHeader({
    From: a.contact,
    To: a.to.join(", "),
    Subject: `Report Domain: ${a.domain} Submitter: ${a.hostname} Report-ID: <${a.reportId}>`,
    Date: new Date().toUTCString().replace(/GMT$/, "+0000"),
    "Message-ID": `<${a.queueId}@${a.hostname}>`,
    "TLS-Report-Domain": a.domain,
    "TLS-Report-Submitter": a.hostname,
  });
  root
    .createChild("text/plain")
    .setContent(
      `This is an aggregate TLS report (RFC 8460) from ${a.hostname} for ${a.domain}, ${a.day} UTC.\n`,
    );
  root.createChild("application/tlsrpt+gzip", { filename }).setContent(a.gz);
  return root.build();
}
