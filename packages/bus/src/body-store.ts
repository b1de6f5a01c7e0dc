import { createHash } from "node:crypto";
import { PassThrough, pipeline, Readable, Transform } from "node:stream";
import { type BodyRef, isSpoolRef, type ObjectBodyRef, type SpoolBodyRef } from "@mailpipe/contracts";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { JetStreamApiError, StorageType } from "@nats-io/jetstream";
import { type ObjectStore, Objm } from "@nats-io/obj";
import { nanos, headers as natsHeaders } from "@nats-io/transport-node";
import { BodyIntegrityError, BodyNotFoundError, BusError } from "./errors.ts";
import { splitPayload } from "./headers.ts";
import { replicasHint } from "./topology.ts";

function describe(ref: BodyRef): string {
  return isSpoolRef(ref) ? `${ref.stream}#${ref.seq}` : `${ref.bucket}/${ref.key}`;
}

function verified(ref: BodyRef, body: Buffer): Buffer {
  const got = createHash("sha256").update(body).digest("hex");
  if (body.length !== ref.size || got !== ref.sha256) {
    throw new BodyIntegrityError(
      `body ${describe(ref)} is corrupt: sha256 ${got} (${body.length} bytes), expected ${ref.sha256}`,
    );
  }
  return body;
}

/** JetStream's "no message found" (a spool message deleted already) */
const NO_MESSAGE_FOUND = 10037;
/** "message delete failed": how a delete of a message that is gone already is answered */
const MSG_DELETE_FAILED = 10057;

function isNoMessage(err: unknown): boolean {
  if (!(err instanceof JetStreamApiError)) return false;
  return (
    err.code === NO_MESSAGE_FOUND || (err.code === MSG_DELETE_FAILED && /no message found/i.test(err.message))
  );
}

export type BodySource = Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

/** Bodies up to this size are read with JetStream direct gets and held in memory once. */
export const DIRECT_READ_MAX = 1024 * 1024;

/** The Object Store's default chunk size; a body up to this size is one chunk. */
export const CHUNK_SIZE = 128 * 1024;

const KEY = /^[A-Za-z0-9_-]{1,128}$/;

/** JetStream's "wrong last sequence" (Nats-Expected-Last-Subject-Sequence not met) */
const WRONG_LAST_SEQUENCE = 10071;

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
  readonly #js: JetStreamClient;
  readonly #jsm: JetStreamManager;

  private constructor(bucket: string, os: ObjectStore, js: JetStreamClient, jsm: JetStreamManager) {
    this.bucket = bucket;
    this.#os = os;
    this.#js = js;
    this.#jsm = jsm;
  }

  /**
   * Opens the bucket, creating it (file storage, TTL, `replicas`) when missing. An existing bucket
   * with fewer replicas is raised to `replicas` (its stream is updated; JetStream copies the data
   * to the new peers); if JetStream refuses, opening fails with what to do. One with more is kept
   * and `warn` says so: a replica with a lower JS_REPLICAS never takes copies away.
   */
  static async open(
    js: JetStreamClient,
    jsm: JetStreamManager,
    bucket: string,
    { ttlMs, replicas, warn }: { ttlMs: number; replicas: number; warn?: (note: string) => void },
  ): Promise<BodyStore> {
    const objm = new Objm(js);
    let os: ObjectStore;
    try {
      os = await objm.create(bucket, { storage: StorageType.File, ttl: nanos(ttlMs), replicas });
    } catch (err) {
      throw new BusError(
        `creating the body bucket ${bucket} failed: ${(err as Error).message}${replicasHint(replicas)}`,
        { cause: err },
      );
    }
    const stream = `OBJ_${bucket}`;
    const have = (await jsm.streams.info(stream)).config;
    if (have.num_replicas < replicas) {
      try {
        await jsm.streams.update(stream, { ...have, num_replicas: replicas });
      } catch (err) {
        throw new BusError(
          `the body bucket ${bucket} has ${have.num_replicas} replica(s) and JS_REPLICAS is ${replicas}; ` +
            `raising it failed (${(err as Error).message}): once ${replicas} NATS nodes are up, run ` +
            `\`nats stream edit ${stream} --replicas ${replicas}\` or restart this service, or set JS_REPLICAS=${have.num_replicas}`,
          { cause: err },
        );
      }
    } else if (have.num_replicas > replicas) {
      warn?.(
        `the body bucket ${bucket} has ${have.num_replicas} replicas and JS_REPLICAS is ${replicas}: kept at ` +
          `${have.num_replicas}; set JS_REPLICAS=${have.num_replicas} on every service, or lower it yourself ` +
          `(nats stream edit ${stream} --replicas ${replicas})`,
      );
    }
    return new BodyStore(bucket, os, js, jsm);
  }

  /**
   * Streams a body in; returns its reference once JetStream has stored every chunk and the
   * object's metadata. Writes the Object Store's own layout (ADR-20: chunks on
   * `$O.<bucket>.C.<nuid>`, metadata rolled up on `$O.<bucket>.M.<name>`), so `nats object get`
   * reads it, but without the library's put: that one first looks the name up (a round trip),
   * hashes in JavaScript and goes through web streams, which made it the costliest step of
   * accepting a message. The chunk subject is named after the key; writing a key again replaces
   * it (see #firstChunk).
   */
  async put(key: string, source: BodySource): Promise<ObjectBodyRef> {
    if (!KEY.test(key)) throw new BusError(`body key ${JSON.stringify(key)} must be a subject token`);
    const hash = createHash("sha256");
    const chunkSubject = `$O.${this.bucket}.C.${key}`;
    let size = 0;
    let chunks = 0;
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    const flush = async (upTo: number) => {
      const all = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes);
      let offset = 0;
      while (all.length - offset >= upTo && all.length - offset > 0) {
        const n = Math.min(CHUNK_SIZE, all.length - offset);
        const payload = all.subarray(offset, offset + n);
        if (chunks === 0) await this.#firstChunk(chunkSubject, payload);
        else await this.#js.publish(chunkSubject, payload);
        hash.update(payload);
        chunks++;
        size += n;
        offset += n;
      }
      pending = offset < all.length ? [all.subarray(offset)] : [];
      pendingBytes = all.length - offset;
    };
    const iterable: AsyncIterable<Uint8Array> | Iterable<Uint8Array> =
      source instanceof Uint8Array ? [source] : source;
    for await (const chunk of iterable) {
      pending.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      pendingBytes += chunk.byteLength;
      if (pendingBytes >= CHUNK_SIZE) await flush(CHUNK_SIZE);
    }
    if (pendingBytes > 0) await flush(1);
    const digest = hash.digest();
    await this.#publishMeta(key, {
      size,
      chunks,
      digest: `SHA-256=${digest.toString("base64").replaceAll("+", "-").replaceAll("/", "_")}`,
      deleted: false,
    });
    return { bucket: this.bucket, key, size, sha256: digest.toString("hex") };
  }

  /**
   * The first chunk must be the first message on its subject, so chunks of two writes of one key
   * never mix. A key is written again only when an earlier write of it was cut short or is being
   * redone (a DSN task retried after a crash): its old chunks are purged first.
   */
  async #firstChunk(subject: string, payload: Uint8Array): Promise<void> {
    const h = natsHeaders();
    h.set("Nats-Expected-Last-Subject-Sequence", "0");
    try {
      await this.#js.publish(subject, payload, { headers: h });
    } catch (err) {
      if (!(err instanceof JetStreamApiError) || err.code !== WRONG_LAST_SEQUENCE) throw err;
      await this.#jsm.streams.purge(`OBJ_${this.bucket}`, { filter: subject });
      await this.#js.publish(subject, payload, { headers: h });
    }
  }

  /** The object's metadata (ADR-20), rolled up so only the latest stays: written last by put, a marker on delete. */
  async #publishMeta(
    key: string,
    fields: { size: number; chunks: number; digest: string; deleted: boolean },
  ): Promise<void> {
    const meta = {
      name: key,
      description: "",
      options: { max_chunk_size: CHUNK_SIZE },
      bucket: this.bucket,
      nuid: key,
      mtime: new Date().toISOString(),
      ...fields,
    };
    const h = natsHeaders();
    h.set("Nats-Rollup", "sub");
    await this.#js.publish(this.#metaSubject(key), JSON.stringify(meta), { headers: h });
  }

  /** `$O.<bucket>.M.<padded base64url of the name>`, as the Object Store names it. */
  #metaSubject(key: string): string {
    const b64 = Buffer.from(key, "utf8").toString("base64").replaceAll("+", "-").replaceAll("/", "_");
    return `$O.${this.bucket}.M.${b64}`;
  }

  /**
   * The body as a Node stream. The stream errors with BodyIntegrityError at its end when the bytes
   * do not match the reference, so a consumer must not commit what it wrote before the end.
   * Destroying the returned stream stops the read underneath.
   */
  async read(ref: BodyRef, attachment?: Buffer): Promise<Readable> {
    if (attachment || isSpoolRef(ref) || ref.size <= DIRECT_READ_MAX) {
      const body = await this.readBuffer(ref, attachment);
      return Readable.from([body], { objectMode: false });
    }
    return this.#readStream(ref);
  }

  async #readStream(ref: ObjectBodyRef): Promise<Readable> {
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

  /**
   * The whole body in memory, verified. For small bodies and for code that must parse it. A
   * request that carried the body as its attachment passes it: then nothing is read from the store.
   */
  async readBuffer(ref: BodyRef, attachment?: Buffer): Promise<Buffer> {
    if (attachment) return verified(ref, attachment);
    if (isSpoolRef(ref)) return this.#readSpooled(ref);
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
  async #readSpooled(ref: SpoolBodyRef): Promise<Buffer> {
    const m = await this.#jsm.direct.getMessage(ref.stream, { seq: ref.seq }).catch((err: unknown) => {
      if (isNoMessage(err)) return null;
      throw err;
    });
    if (!m) throw new BodyNotFoundError(`body ${describe(ref)} not found (expired or deleted?)`);
    const { attachment } = splitPayload(m.data, m.header);
    if (!attachment) throw new BodyNotFoundError(`spool message ${describe(ref)} carries no body`);
    return verified(ref, attachment);
  }

  async #readDirect(ref: ObjectBodyRef): Promise<Buffer> {
    const stream = `OBJ_${ref.bucket}`;
    if (ref.size > 0 && ref.size <= CHUNK_SIZE) {
      // written by put(): one chunk, on the subject named after the key; one get, no metadata
      let m: Awaited<ReturnType<JetStreamManager["direct"]["getMessage"]>> = null;
      try {
        m = await this.#jsm.direct.getMessage(stream, { last_by_subj: `$O.${ref.bucket}.C.${ref.key}` });
      } catch {
        m = null;
      }
      if (m) return verified(ref, Buffer.from(m.data));
    }
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
    const chunks: Uint8Array[] = [];
    let seq = 0;
    for (let i = 0; i < meta.chunks; i++) {
      const m = await this.#jsm.direct.getMessage(stream, { seq: seq + 1, next_by_subj: subject });
      if (!m) break;
      seq = m.seq;
      chunks.push(m.data);
    }
    return verified(ref, Buffer.concat(chunks));
  }

  async exists(key: string): Promise<boolean> {
    const info = await this.#os.info(key);
    return !!info && !info.deleted;
  }

  /**
   * Deletes a body: its chunks are purged and its metadata becomes the Object Store's deletion
   * marker. Deleting one that is already gone is not an error.
   */
  async delete(key: string): Promise<void> {
    await this.#publishMeta(key, { size: 0, chunks: 0, digest: "", deleted: true });
    await this.#jsm.streams.purge(`OBJ_${this.bucket}`, { filter: `$O.${this.bucket}.C.${key}` });
  }

  /**
   * Deletes a spool message (envelope and attached body) once its message is final. One already
   * gone is not an error.
   */
  async deleteSpooled(stream: string, seq: number): Promise<void> {
    try {
      await this.#jsm.streams.deleteMessage(stream, seq, false);
    } catch (err) {
      if (isNoMessage(err)) return;
      throw err;
    }
  }

  /** Bytes and objects held, for metrics. */
  async usage(): Promise<{ bytes: number; messages: number }> {
    const info = await this.#jsm.streams.info(`OBJ_${this.bucket}`);
    return { bytes: info.state.bytes, messages: info.state.messages };
  }
}
