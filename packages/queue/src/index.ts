export { DEFAULT_PREFIX, MailQueue, type MailQueueOptions, QueueDataError } from "./queue.ts";
export type {
  ClaimedJob,
  CreateResult,
  DsnJob,
  FinalState,
  FinishResult,
  GcJob,
  MessageInput,
  MessageRecord,
  MessageState,
  OutcomePatch,
  QueueStats,
  RecipientRecord,
  RecipientState,
  RetryJob,
  ScheduledEntry,
  ScheduleResult,
} from "./types.ts";
