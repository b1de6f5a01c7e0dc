import type { MsgHdrs } from "@nats-io/transport-node";
import type { TextMapGetter, TextMapSetter } from "@opentelemetry/api";

export const natsHeaderSetter: TextMapSetter<MsgHdrs> = {
  set(carrier, key, value) {
    carrier.set(key, value);
  },
};

export const natsHeaderGetter: TextMapGetter<MsgHdrs | undefined> = {
  keys(carrier) {
    return carrier ? carrier.keys() : [];
  },
  get(carrier, key) {
    if (!carrier) return undefined;
    const v = carrier.get(key);
    return v === "" ? undefined : v;
  },
};

/**
 * A message with an attachment carries its JSON first and the attachment's bytes after it, in one
 * payload; this header gives the JSON's length in bytes. No copy into JSON (no base64), and a
 * reader takes the attachment as a view of the payload.
 */
export const ATTACHMENT_OFFSET = "Mailpipe-Attachment-Offset";

/** The JSON part and the attachment of a payload (a view, not a copy). */
export function splitPayload(
  data: Uint8Array,
  headers: { get(key: string): string } | undefined,
): { json: Uint8Array; attachment?: Buffer } {
  const raw = headers?.get(ATTACHMENT_OFFSET);
  if (!raw) return { json: data };
  const offset = Number(raw);
  if (!Number.isInteger(offset) || offset < 0 || offset > data.byteLength) {
    throw new RangeError(`${ATTACHMENT_OFFSET} ${JSON.stringify(raw)} is not within the payload`);
  }
  return {
    json: data.subarray(0, offset),
    attachment: Buffer.from(data.buffer, data.byteOffset + offset, data.byteLength - offset),
  };
}
