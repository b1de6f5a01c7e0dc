// The DNS server `npm start` runs on loopback: the development domain's records (MX, SPF, DKIM,
// DMARC) from here, every other name from the system's resolvers (/etc/resolv.conf), so mail to the
// Internet is delivered for real. Without a reachable resolver a lookup fails temporarily (SERVFAIL)
// and the router defers the message as production would; it never bounces it for a missing domain.
import { parseServer, readResolvConf } from "@mailpipe/dns";
import { type DnsRecords, type DnsServerHandle, reverseName, startDnsServer } from "@mailpipe/testing";

export const DEV_DOMAIN = "example.test";

/**
 * Answered here (NXDOMAIN unless held), never forwarded: the development domain, the special-use
 * names of RFC 6761 that caching resolvers answer negatively at once (test, invalid, localhost), and
 * the reverse zones of loopback and private addresses that RFC 6303 serves locally. So a sender like
 * someone@elsewhere.test, or a reverse lookup of 127.0.0.1, is answered at once, online or not.
 */
export const LOCAL_ZONES = [
  DEV_DOMAIN,
  "test",
  "invalid",
  "localhost",
  "127.in-addr.arpa",
  "10.in-addr.arpa",
  "168.192.in-addr.arpa",
  ...Array.from({ length: 16 }, (_, i) => `${16 + i}.172.in-addr.arpa`),
  reverseName("::1"),
];

export interface DevDnsOptions {
  host: string;
  /** 0: any free port. */
  port: number;
  /** The development DKIM key's TXT value, when there is one. */
  dkimValue?: string;
  /** Upstream resolvers, "host[:port]"; default: the nameservers of /etc/resolv.conf. */
  upstream?: string[];
  /** Per question, all upstreams together; default 1500 ms. */
  timeoutMs?: number;
}

export function devRecords(host: string, dkimValue?: string): Record<string, DnsRecords> {
  return {
    [DEV_DOMAIN]: {
      MX: [{ exchange: `mail.${DEV_DOMAIN}`, priority: 10 }],
      TXT: ["v=spf1 ip4:127.0.0.0/8 -all"],
    },
    [`mail.${DEV_DOMAIN}`]: { A: [host] },
    [`_dmarc.${DEV_DOMAIN}`]: { TXT: ["v=DMARC1; p=none"] },
    ...(dkimValue ? { [`mail._domainkey.${DEV_DOMAIN}`]: { TXT: [dkimValue] } } : {}),
  };
}

export interface DevDns {
  server: DnsServerHandle;
  /** The resolvers other names go to, as "host:port". */
  upstream: string[];
}

export async function startDevDns(options: DevDnsOptions): Promise<DevDns> {
  // never forward to ourselves (DEV_DNS_PORT=53 with 127.0.0.1 in resolv.conf would loop)
  const upstream = (options.upstream ?? readResolvConf())
    .map((s) => parseServer(s))
    .filter((s) => !(s.host === options.host && s.port === options.port))
    .map((s) => s.label);
  const server = await startDnsServer({
    host: options.host,
    port: options.port,
    records: devRecords(options.host, options.dkimValue),
    forward: {
      servers: upstream,
      localZones: LOCAL_ZONES,
      ...(options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs }),
    },
  });
  return { server, upstream };
}
