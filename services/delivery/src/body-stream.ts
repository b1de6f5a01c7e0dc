import { Readable } from "node:stream";

/**
 * A body stream that opens its source only when first read. nodemailer starts reading once the
 * server has answered DATA with 354, so a transaction refused at MAIL or RCPT never fetches the
 * body, and no Object Store read is held open while the envelope is being negotiated.
 */
export function lazyBody(open: () => Promise<Readable>): Readable {
  async function* chunks(): AsyncGenerator<Buffer> {
    // for-await destroys the source when the consumer gives up early
    for await (const chunk of await open()) yield chunk as Buffer;
  }
  return Readable.from(chunks(), { objectMode: false });
}
