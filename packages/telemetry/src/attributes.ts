/**
 * Span attribute names. Messaging ones follow the OpenTelemetry messaging conventions; the
 * `mail.*` and `smtp.*` ones are ours (documented in the README's tracing section).
 * Never put message bodies, subjects or passwords in an attribute.
 */
export const attr = {
  // OpenTelemetry messaging semantic conventions
  messagingSystem: "messaging.system",
  messagingDestination: "messaging.destination.name",
  messagingOperationType: "messaging.operation.type",
  messagingOperationName: "messaging.operation.name",
  messagingMessageId: "messaging.message.id",
  messagingConsumerGroup: "messaging.consumer.group.name",
  messagingDeliveryCount: "messaging.nats.delivery_count",
  // network (OpenTelemetry general conventions)
  serverAddress: "server.address",
  serverPort: "server.port",
  peerAddress: "network.peer.address",
  peerPort: "network.peer.port",
  clientAddress: "client.address",
  tlsProtocol: "tls.protocol.version",
  // ours
  queueId: "mail.queue_id",
  source: "mail.source",
  recipientCount: "mail.recipient.count",
  recipientDomain: "mail.recipient.domain",
  senderDomain: "mail.sender.domain",
  destination: "mail.destination",
  attempt: "mail.attempt",
  outcome: "mail.outcome",
  size: "mail.size",
  mx: "mail.mx.host",
  smtpCommand: "smtp.command",
  replyCode: "smtp.reply.code",
  replyEnhanced: "smtp.reply.enhanced_code",
} as const;
