import { z } from "zod";

const Size = z.number().int().nonnegative();
/** hex SHA-256 of the body's bytes, checked on every read */
const Sha256 = z.string().regex(/^[0-9a-f]{64}$/);

/** A body in the JetStream Object Store (bodies too large to travel inside the spool message). */
export const ObjectBodyRef = z.strictObject({
  bucket: z.string().min(1).max(64),
  key: z.string().min(1).max(256),
  size: Size,
  sha256: Sha256,
});
export type ObjectBodyRef = z.infer<typeof ObjectBodyRef>;

/**
 * A body that travels as the attachment of its spool message (`mail.v1.spool`): the message at
 * `seq` of `stream` holds the envelope and the body together, like a Postfix queue file.
 */
export const SpoolBodyRef = z.strictObject({
  stream: z.string().min(1).max(64),
  seq: z.number().int().positive(),
  size: Size,
  sha256: Sha256,
});
export type SpoolBodyRef = z.infer<typeof SpoolBodyRef>;

/** Where a message body lives: messages on the bus carry this (and small ones the bytes too). */
export const BodyRef = z.union([SpoolBodyRef, ObjectBodyRef]);
export type BodyRef = z.infer<typeof BodyRef>;

/** The body is this message's own attachment (the spool message): its size and digest. */
export const AttachedBody = z.strictObject({ attached: z.literal(true), size: Size, sha256: Sha256 });
export type AttachedBody = z.infer<typeof AttachedBody>;

export function isSpoolRef(ref: BodyRef): ref is SpoolBodyRef {
  return "stream" in ref;
}
