import { createHash } from "node:crypto";
import { Readable, Transform } from "node:stream";
import type { BodyRef } from "@mailpipe/contracts";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { StorageType } from "@nats-io/jetstream";
import { type ObjectStore, Objm } from "@nats-io/obj";
import { nanos } from "@nats-io/transport-node";
import { BodyIntegrityError, BodyNotFoundError } from "./errors.ts";

export type BodySource = Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

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
   */
  async read(ref: BodyRef): Promise<Readable> {
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
    source.on("error", (err) => check.destroy(err));
    return source.pipe(check);
  }

  /** The whole body in memory, verified. For small bodies and for code that must parse it. */
  async readBuffer(ref: BodyRef): Promise<Buffer> {
    const chunks: Buffer[] = [];
    for await (const chunk of await this.read(ref)) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
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
