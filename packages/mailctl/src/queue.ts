import { type Io, UsageError } from "./io.ts";

/** `mailctl queue …`: filled in once packages/queue lands. */
export async function queueCommand(_args: string[], _flags: Record<string, unknown>, _io: Io): Promise<void> {
  throw new UsageError("queue commands are not available yet");
}
