import { z } from "zod";

/** Where a message body lives: messages on the bus carry this, never the body itself. */
export const BodyRef = z.strictObject({
  bucket: z.string().min(1).max(64),
  key: z.string().min(1).max(256),
  size: z.number().int().nonnegative(),
  /** hex SHA-256 of the stored bytes, checked on every read */
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
});
export type BodyRef = z.infer<typeof BodyRef>;
