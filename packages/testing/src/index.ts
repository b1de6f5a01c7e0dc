export type { Exit } from "./children.ts";
export {
  type DnsForwarding,
  type DnsQuery,
  type DnsRecords,
  type DnsServerHandle,
  type MxRecord,
  reverseName,
  type StartDnsServerOptions,
  startDnsServer,
} from "./dns-server.ts";
export {
  type DovecotHandle,
  type DovecotUser,
  type ImapMessage,
  imapFetchAll,
  lmtpSettings,
  type StartDovecotOptions,
  startDovecot,
} from "./dovecot.ts";
export {
  type NatsClusterHandle,
  type NatsNodeHandle,
  type StartNatsClusterOptions,
  startNatsCluster,
} from "./nats-cluster.ts";
export { type OtlpReceiver, type ReceivedSpan, startOtlpReceiver } from "./otlp-receiver.ts";
export {
  freePort,
  type LogMatch,
  repoRoot,
  type ServiceHandle,
  type StartServiceOptions,
  startService,
  type TempDir,
  tempDir,
  type WaitForOptions,
  waitFor,
} from "./process.ts";
export {
  GTUBE,
  RSPAMD_TEST_TRIGGERS,
  type RspamdHandle,
  type StartRspamdOptions,
  startRspamd,
} from "./rspamd.ts";
export {
  chooseServerMode,
  detectContainerRuntime,
  findBinary,
  type NatsHandle,
  type RedisSentinelHandle,
  type ServerHandle,
  type ServerMode,
  type ServerModeInput,
  type StartNatsOptions,
  type StartRedisOptions,
  type StartRedisSentinelOptions,
  startNats,
  startRedis,
  startRedisSentinel,
} from "./servers.ts";
export {
  type Action,
  type PeerContext,
  type PeerMessage,
  type PeerScript,
  type PeerStage,
  type SmtpPeer,
  type StartSmtpPeerOptions,
  type Step,
  sequence,
  startSmtpPeer,
} from "./smtp-peer.ts";
export {
  type CertPair,
  createSelfSignedCert,
  createTestCa,
  type SelfSignedCertOptions,
  type TestCa,
} from "./tls.ts";
export {
  type StartUnboundOptions,
  startUnbound,
  type UnboundAnswer,
  type UnboundHandle,
  type UnboundZone,
} from "./unbound.ts";
