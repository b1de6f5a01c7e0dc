export { createResolver, normalizeName } from "./client.ts";
export { dnsServersSetting } from "./config.ts";
export { type MailHost, type MailHosts, resolveMailHosts } from "./mail-hosts.ts";
export {
  type MailauthAnswer,
  type MailauthResolverFn,
  mailauthResolver,
  type NodeDnsError,
  reverseName,
} from "./mailauth.ts";
export { parseServer, parseServerList, readResolvConf, type ServerAddress } from "./servers.ts";
export { EDNS_UDP_SIZE } from "./transport.ts";
export {
  type AddressRecord,
  type CacheStats,
  type DnsAnswer,
  DnsError,
  type DnsErrorCode,
  type DnsRecord,
  type DnsResolver,
  type Lookup,
  type MxRecord,
  type RecordData,
  type ResolverOptions,
  RR_TYPES,
  type RRType,
} from "./types.ts";
