import { createHash } from "node:crypto";
import { PassThrough, pipeline, Readable, Transform } from "node:stream";
import type { BodyRef } from "@mailpipe/contracts";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { StorageType } from "@nats-io/jetstream";
import { type ObjectStore, Objm } from "@nats-io/obj";
import { nanos } from "@nats-io/transport-node";
import { BodyIntegrityError, BodyNotFoundError } from "./errors.ts";

export type BodySource = Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

/** Bodies up to this size are read with JetStream direct gets and held in memory once. */
export const DIRECT_READ_MAX = 1024 * 1024;

/** An object's metadata as the Object Store writes it (ADR-20); only what we read. */
interface ObjectMeta {
  nuid?: string;
  size?: number;
  chunks?: number;
  deleted?: boolean;
  options?: { link?: unknown };
}

class NotPlainObject extends Error {}

/**
 * Message bodies in a JetStream Object Store bucket. Written once before the SMTP 250, read by
 * each consumer as a stream, checked against the size and sha256 in the reference on every read.
 */
export class BodyStore {
  readonly bucket: string;
  readonly #os: ObjectStore;
  readonly #jsm: JetStreamManager;

  private constructor(bucket: string, os: ObjectStore, jsm: JetStreamManager) {
    this.bucket = bucket;
    this.#os = os;
    this.#jsm = jsm;
  }

  /** Opens the bucket, creating it (file storage, TTL) when missing. */
  static async open(
    js: JetStreamClient,
    jsm: JetStreamManager,
    bucket: string,
    { ttlMs, replicas }: { ttlMs: number; replicas: number },
  ): Promise<BodyStore> {
    const objm = new Objm(js);
    const os = await objm.create(bucket, { storage: StorageType.File, ttl: nanos(ttlMs), replicas });
    return new BodyStore(bucket, os, jsm);
  }

  /** Streams a body in; returns its reference once JetStream has stored every chunk. */
  async put(key: string, source: BodySource): Promise<BodyRef> {
    const hash = createHash("sha256");
    let size = 0;
    const iterable: AsyncIterable<Uint8Array> | Iterable<Uint8Array> =
      source instanceof Uint8Array ? [source] : source;
    async function* counted() {
      for await (const chunk of iterable) {
        hash.update(chunk);
        size += chunk.byteLength;
        yield chunk;
      }
    }
    await this.#os.put({ name: key }, ReadableStream.from(counted()));
    return { bucket: this.bucket, key, size, sha256: hash.digest("hex") };
  }

  /**
   * The body as a Node stream. The stream errors with BodyIntegrityError at its end when the bytes
   * do not match the reference, so a consumer must not commit what it wrote before the end.
   * Destroying the returned stream stops the read underneath.
   */
  async read(ref: BodyRef): Promise<Readable> {
    if (ref.size <= DIRECT_READ_MAX) {
      const body = await this.readBuffer(ref);
      return Readable.from([body], { objectMode: false });
    }
    return this.#readStream(ref);
  }

  async #readStream(ref: BodyRef): Promise<Readable> {
    const result = await this.#os.get(ref.key);
    if (!result) throw new BodyNotFoundError(`body ${ref.bucket}/${ref.key} not found (expired or deleted?)`);
    if (result.info.size !== ref.size) {
      await result.data.cancel().catch(() => {});
      throw new BodyIntegrityError(
        `body ${ref.key} has ${result.info.size} bytes stored, the reference says ${ref.size}`,
      );
    }
    const hash = createHash("sha256");
    let size = 0;
    const check = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        size += chunk.length;
        cb(null, chunk);
      },
      flush(cb) {
        const got = hash.digest("hex");
        if (size !== ref.size || got !== ref.sha256) {
          cb(
            new BodyIntegrityError(
              `body ${ref.key} is corrupt: sha256 ${got} (${size} bytes), expected ${ref.sha256}`,
            ),
          );
        } else cb();
      },
    });
    const source = Readable.fromWeb(result.data as import("node:stream/web").ReadableStream<Uint8Array>);
    const out = new PassThrough();
    // pipeline tears the whole chain down when `out` is destroyed, cancelling the store read
    pipeline(source, check, out, () => {});
    return out;
  }

  /** The whole body in memory, verified. For small bodies and for code that must parse it. */
  async readBuffer(ref: BodyRef): Promise<Buffer> {
    if (ref.size <= DIRECT_READ_MAX) {
      try {
        return await this.#readDirect(ref);
      } catch (err) {
        if (!(err instanceof NotPlainObject)) throw err;
      }
    }
    const chunks: Buffer[] = [];
    for await (const chunk of await this.#readStream(ref)) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  }

  /**
   * Reads with JetStream direct gets (the meta message, then each chunk by subject) instead of the
   * Object Store's get(), which creates and deletes a consumer on the server per read: at a few
   * hundred reads a second those consumers, not the disk, become the ceiling. The subjects are the
   * Object Store's documented layout (ADR-20); anything unexpected falls back to get().
   */
  async #readDirect(ref: BodyRef): Promise<Buffer> {
    const stream = `OBJ_${ref.bucket}`;
    // the Object Store's padded base64url of the name
    const name = Buffer.from(ref.key, "utf8").toString("base64").replaceAll("+", "-").replaceAll("/", "_");
    let metaMsg: Awaited<ReturnType<JetStreamManager["direct"]["getMessage"]>>;
    try {
      metaMsg = await this.#jsm.direct.getMessage(stream, { last_by_subj: `$O.${ref.bucket}.M.${name}` });
    } catch (err) {
      throw new NotPlainObject((err as Error).message);
    }
    if (!metaMsg)
      throw new BodyNotFoundError(`body ${ref.bucket}/${ref.key} not found (expired or deleted?)`);
    const meta = metaMsg.json<ObjectMeta>();
    if (meta.deleted) throw new BodyNotFoundError(`body ${ref.bucket}/${ref.key} was deleted`);
    if (meta.options?.link || typeof meta.nuid !== "string" || typeof meta.chunks !== "number") {
      throw new NotPlainObject("not a plain object");
    }
    if (meta.size !== ref.size) {
      throw new BodyIntegrityError(
        `body ${ref.key} has ${meta.size} bytes stored, the reference says ${ref.size}`,
      );
    }
    const subject = `$O.${ref.bucket}.C.${meta.nuid}`;
    const hash = createHash("sha256");
    const chunks: Uint8Array[] = [];
    let seq = 0;
    for (let i = 0; i < meta.chunks; i++) {
      const m = await this.#jsm.direct.getMessage(stream, { seq: seq + 1, next_by_subj: subject });
      if (!m) break;
      seq = m.seq;
      hash.update(m.data);
      chunks.push(m.data);
    }
    const body = Buffer.concat(chunks);
    const got = hash.digest("hex");
    if (body.length !== ref.size || got !== ref.sha256) {
      throw new BodyIntegrityError(
        `body ${ref.key} is corrupt: sha256 ${got} (${body.length} bytes), expected ${ref.sha256}`,
      );
    }
    return body;
  }

  async exists(key: string): Promise<boolean> {
    const info = await this.#os.info(key);
    return !!info && !info.deleted;
  }

  /** Deletes a body; deleting one that is already gone is not an error. */
  async delete(key: string): Promise<void> {
    try {
      await this.#os.delete(key);
    } catch (err) {
      if (/not found/i.test((err as Error).message)) return;
      throw err;
    }
  }

  /** Bytes and objects held, for metrics. */
  async usage(): Promise<{ bytes: number; messages: number }> {
    const info = await this.#jsm.streams.info(`OBJ_${this.bucket}`);
    return { bytes: info.state.bytes, messages: info.state.messages };
  }
}
