import { directoryFileSetting } from "@mailpipe/directory";
import { dnsServersSetting } from "@mailpipe/dns";
import { baseConfig, bool, duration, port } from "@mailpipe/service-kit";
import { z } from "zod";
import { tlsPolicySetting } from "./tls-policy.ts";

const count = (defaultValue: number, max = 100_000) =>
  z.coerce.number().int().min(1).max(max).default(defaultValue);

/** A duration that must be positive: a zero timeout would fail every session at once. */
const positive = (defaultValue: string) =>
  duration(defaultValue).refine((ms) => ms > 0, { message: "must be longer than 0" });

/** on/off (also true/false, 1/0, yes/no) */
const onOff = (defaultValue: boolean) =>
  z
    .enum(["on", "off", "true", "false", "1", "0", "yes", "no"])
    .default(defaultValue ? "on" : "off")
    .transform((v) => v === "on" || v === "true" || v === "1" || v === "yes");

/** delivery's environment (README.md lists every variable with its default). */
export const config = baseConfig
  .extend({
    /** port of the remote MX hosts */
    SMTP_REMOTE_PORT: port(25),
    /** SMTP transactions at once in this process */
    DELIVERY_CONCURRENCY: count(100, 10_000),
    /**
     * a request whose destination slot's lease ran out before it started, at a site that is full
     * meanwhile, goes back to JetStream for this long (±20%); the router sets the limits
     */
    DESTINATION_BUSY_DELAY: positive("2s"),
    /** TCP connect, per address */
    SMTP_CONNECT_TIMEOUT: positive("30s"),
    /** RFC 5321 4.5.3.2: initial 220 greeting */
    SMTP_GREETING_TIMEOUT: positive("5m"),
    /** RFC 5321 4.5.3.2: EHLO, STARTTLS, MAIL, RCPT, RSET replies */
    SMTP_COMMAND_TIMEOUT: positive("5m"),
    /** RFC 5321 4.5.3.2: the 354 reply to DATA */
    SMTP_DATA_INIT_TIMEOUT: positive("2m"),
    /** RFC 5321 4.5.3.2: no progress while sending the message */
    SMTP_DATA_BLOCK_TIMEOUT: positive("3m"),
    /** RFC 5321 4.5.3.2: the reply after the final dot */
    SMTP_DATA_DONE_TIMEOUT: positive("10m"),
    /**
     * the default TLS policy for destinations with none of their own: false: opportunistic (TLS when
     * offered, any certificate); true: verify (TLS with a certificate valid for the MX name)
     */
    SMTP_TLS_VERIFY: bool(false),
    /** retry a host without TLS when its STARTTLS handshake fails (only under an opportunistic policy) */
    SMTP_TLS_FALLBACK_PLAIN: bool(true),
    /**
     * per destination (domain, "mx:<host>", "mx:*.<suffix>"): opportunistic | required | verify, YAML
     * or JSON; wins over MTA-STS, DANE and the default
     */
    TLS_POLICY: tlsPolicySetting(),
    /**
     * PEM file of CA certificates trusted besides Node's bundled roots, for MX certificates and
     * MTA-STS policy hosts (a private CA; the tests' CA)
     */
    OUTBOUND_TLS_CA_FILE: z.string().default(""),
    /** resolvers for MTA-STS and TLS-RPT lookups (empty: /etc/resolv.conf) */
    DNS_SERVERS: dnsServersSetting(),
    /** honour the MTA-STS policies (RFC 8461) destinations publish; the cache is in Redis */
    MTA_STS: onOff(true),
    /** port of the HTTPS policy hosts (443; tests use another) */
    MTA_STS_PORT: port(443),
    /** the whole policy fetch, connect to last byte */
    MTA_STS_FETCH_TIMEOUT: positive("20s"),
    /**
     * a cached policy older than this, or than half its max_age if that is shorter, is fetched again
     * in the background when a message uses it (one replica per domain); a failed refresh keeps it
     */
    MTA_STS_REFRESH_AFTER: positive("1d"),
    /** count TLS results per destination with a policy (Redis) and send the daily TLS-RPT reports */
    TLSRPT: onOff(true),
    /** organization-name of the reports; empty: MAIL_HOSTNAME */
    TLSRPT_ORGANIZATION: z.string().max(200).default(""),
    /** contact-info and From: of the reports; empty: postmaster@MAIL_HOSTNAME */
    TLSRPT_CONTACT: z.string().max(320).default(""),
    /**
     * the directory msa reads: the reports are DKIM-signed with its key for the From's domain (or a
     * parent); read only with TLSRPT=on, and a missing file means unsigned reports (warned)
     */
    DIRECTORY_FILE: directoryFileSetting(),
    /** DANE (RFC 7672): TLSA records from DANE_RESOLVERS require TLS and a matching certificate */
    DANE: onOff(false),
    /**
     * DNSSEC-validating resolvers (host[:port] list) whose AD bit DANE trusts, e.g. a local unbound;
     * required with DANE=on (no other resolver's AD bit is believed)
     */
    DANE_RESOLVERS: dnsServersSetting(),
    SMTP_REUSE_CONNECTIONS: bool(true),
    SMTP_MAX_MESSAGES_PER_CONNECTION: count(100),
    SMTP_IDLE_CONNECTION_TIMEOUT: positive("30s"),
    /** JetStream ack wait; the bus keeps extending it while a transaction runs */
    DELIVERY_ACK_WAIT: positive("2m"),
    /**
     * destinations with their own `destination` label on delivery_outcomes_total (the first ones seen
     * by this process); later ones are counted as "other", so the series stay bounded
     */
    METRICS_MAX_DESTINATIONS: z.coerce.number().int().min(0).max(100_000).default(200),
    /** refuse to connect to loopback, private and link-local addresses (SSRF through MX records) */
    SMTP_BLOCK_LOCAL_ADDRESSES: bool(true),
  })
  .superRefine((c, ctx) => {
    if (c.DANE && c.DANE_RESOLVERS.length === 0) {
      ctx.addIssue({
        code: "custom",
        path: ["DANE_RESOLVERS"],
        message:
          "DANE=on needs the DNSSEC-validating resolvers whose AD bit to trust (e.g. 127.0.0.1 for a local unbound)",
      });
    }
  });
export type Config = z.infer<typeof config>;
