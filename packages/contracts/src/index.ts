export {
  Address,
  Domain,
  normalizeDomain,
  type ParsedAddress,
  parseAddress,
  ReversePath,
} from "./address.ts";
export { AttachedBody, BodyRef, isSpoolRef, ObjectBodyRef, SpoolBodyRef } from "./body-ref.ts";
export { ContractError, type DecodeOptions, decode, decodeJson } from "./decode.ts";
export {
  ClientInfo,
  DsnNotify,
  Envelope,
  EnvelopeDsn,
  EnvelopeRecipient,
  EVENT_TYPES,
  EventType,
  FILTER_ACTIONS,
  FilterAction,
  FilterVerdict,
  LocalDeliveryRequest,
  MailEvent,
  MxHost,
  Outcome,
  QueuedMail,
  QueueId,
  RecipientStatus,
  RemoteDeliveryRequest,
  RequestSlot,
  ServiceName,
  SlotRef,
  statusMsgId,
} from "./messages.ts";
export { isQueueId, newQueueId, QUEUE_ID_PATTERN, queueIdTime } from "./queue-id.ts";
export {
  formatReply,
  isPermanent,
  isTemporary,
  parseRemoteReply,
  Reply,
  replies,
  reply,
  SmtpError,
} from "./smtp-reply.ts";
export {
  type ConsumerKey,
  destinationFromToken,
  destinationToken,
  type StreamKey,
  SubjectError,
  subjects,
  token,
  topology,
  trackBucket,
  trackHash,
} from "./subjects.ts";
export {
  type DayResults,
  type FailureCount,
  parseDayResults,
  type ReportPolicy,
  type StsPolicy,
  type TlsPolicyType,
  tlsDayOf,
  tlsKeys,
} from "./tls-state.ts";
