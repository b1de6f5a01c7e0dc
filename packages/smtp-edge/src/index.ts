export { type Accepted, type AcceptInput, acceptMessage } from "./accept.ts";
export { edgeConfig, edgeLimits, filterConfig, filterSettings } from "./config.ts";
export {
  applyVerdict,
  ContentFilter,
  type ContentFilterOptions,
  type FilterInput,
  type FilterOutcome,
  SPAM_HEADERS,
  sanitizeReplyText,
  spamHeaders,
} from "./filter.ts";
export {
  type ByteLease,
  type HeaderField,
  headerBlock,
  type IncomingMessage,
  type IntakeResult,
  LineEndingNormalizer,
  MAX_HEADER_BYTES,
  parseHeaderBlock,
  readMessage,
} from "./intake.ts";
export { MemoryBudget } from "./memory-budget.ts";
export { type EdgeMetrics, edgeMetrics } from "./metrics.ts";
export { installSmtpServerPatches, leadingEnhancedCode } from "./patches.ts";
export { buildReceived, type ReceivedOptions, receivedProtocol, rfc5322Date } from "./received.ts";
export {
  parseAnswer,
  RspamdClient,
  type RspamdClientOptions,
  RspamdError,
  type RspamdRequest,
  type RspamdVerdict,
} from "./rspamd.ts";
export {
  createSmtpEdge,
  type EdgeClient,
  type EdgeHooks,
  type MessageDecision,
  type SmtpEdge,
  type SmtpEdgeOptions,
  type Transaction,
} from "./server.ts";
export {
  loadTlsFiles,
  type TlsFiles,
  TlsFilesError,
  type TlsPair,
  type TlsWatcher,
  watchTlsFiles,
} from "./tls-files.ts";
