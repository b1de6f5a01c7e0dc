import { relative } from "node:path";
import { Readable } from "node:stream";
import {
  BodyIntegrityError,
  BodyNotFoundError,
  type BodyStore,
  type Bus,
  type HandlerContext,
  type Outcome,
  outcome,
} from "@mailpipe/bus";
import {
  isPermanent,
  type LocalDeliveryRequest,
  parseAddress,
  parseRemoteReply,
  RecipientStatus,
  type Reply,
  replies,
  type Outcome as StatusOutcome,
  statusMsgId,
  subjects,
} from "@mailpipe/contracts";
import type { Directory } from "@mailpipe/directory";
import { attr, inSpan, type Telemetry } from "@mailpipe/telemetry";
import type { Redis } from "ioredis";
import type { LmtpClient } from "./lmtp.ts";
import {
  DirSyncer,
  deliveryHeader,
  type Folder,
  MaildirStore,
  markedAsSpam,
  messageName,
  TmpInUseError,
} from "./maildir.ts";
import { MaildirIo } from "./maildir-io.ts";
import { QuotaTracker } from "./quota.ts";

/** Bodies up to this size are read once per request and written from memory; larger ones stream. */
export const MAX_BUFFERED_BODY = 1024 * 1024;

/** How long the "already delivered" marker outlives a delivery (longer than any redelivery). */
const MARKER_TTL_SECONDS = 7 * 24 * 3600;

/** ENOSPC / EDQUOT: the disk, not the mailbox, is full (RFC 3463 X.3.1). */

/** The temporary reply for a failed copy; paths and stack traces stay in the log. */
export function replyForError(err: unknown): Reply {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === "ENOSPC" || code === "EDQUOT" ? replies.insufficientStorage() : replies.localError();
}

/** `mda:done:<queueId>:<address>`: set once a copy is in new/, checked before writing one. */
export function doneKey(queueId: string, address: string): string {
  return `mda:done:${queueId}:${address.toLowerCase()}`;
}

type Recipient = LocalDeliveryRequest["recipients"][number];

type CopyResult =
  | { outcome: StatusOutcome; reply: Reply }
  /**
   * another worker holds this copy's tmp file, or (LMTP) Redis cannot say whether the copy was
   * delivered already: try the request again later, report nothing now
   */
  | { outcome: "busy"; reason: string };

/** The marker's value in LMTP mode: `lmtp <code> <enhanced> <text>`, Dovecot's reply. */
function lmtpMarker(r: Reply): string {
  return `lmtp ${r.code} ${r.enhanced} ${r.text}`;
}

function replyOfMarker(value: string): Reply | undefined {
  const m = /^lmtp (2\d\d) (.*)$/s.exec(value);
  return m ? parseRemoteReply(Number(m[1]), m[2]!) : undefined;
}

export interface DelivererDeps {
  maildirRoot: string;
  /** MAIL_HOSTNAME: in message names and as the status's remoteMta */
  hostname: string;
  fsync: boolean;
  /** the consumer's ack wait: a tmp file older than half of it was left by a dead writer */
  ackWaitMs: number;
  bus: Pick<Bus, "publish" | "emit">;
  bodies: Pick<BodyStore, "read" | "readBuffer">;
  redis: Pick<Redis, "exists" | "get" | "set">;
  /**
   * MDA_BACKEND=lmtp: each copy goes over LMTP to this server (Dovecot), which files it (Sieve)
   * and keeps the quota; nothing is written here, and maildirRoot is not used
   */
  lmtp?: LmtpClient;
  /** the directory in use (it reloads, so ask per delivery) */
  directory: () => Pick<Directory, "quota" | "domainPolicy">;
  telemetry: Telemetry;
  /** MDA_MAX_AUTO_FOLDERS: +tag folders are created only below this many folders (default 50; 0 = never) */
  maxAutoFolders?: number;
  /** how long a mailbox's counted usage is trusted (default 5 s) */
  quotaCacheMs?: number;
  /** the Maildir calls inline (a local filesystem; see maildir-io.ts) or through the thread pool */
  inlineIo?: boolean;
}

export interface Deliverer {
  /** the bus handler: one copy per recipient, one status each, then ack */
  handle(request: LocalDeliveryRequest, ctx?: Pick<HandlerContext, "attachment">): Promise<Outcome | void>;
  readonly store: MaildirStore;
}

export function createDeliverer(deps: DelivererDeps): Deliverer {
  const { bus, bodies, redis, telemetry, hostname } = deps;
  const { log, tracer, metrics } = telemetry;
  const staleTmpMs = Math.max(1000, Math.floor(deps.ackWaitMs / 2));
  const io = new MaildirIo(deps.inlineIo ?? false);
  const store = new MaildirStore({
    root: deps.maildirRoot,
    fsync: deps.fsync,
    staleTmpMs,
    io,
    syncer: new DirSyncer({ syncDir: (d) => io.syncDir(d) }),
    ...(deps.maxAutoFolders !== undefined ? { maxAutoFolders: deps.maxAutoFolders } : {}),
  });
  const quotas = new QuotaTracker({ cacheMs: deps.quotaCacheMs ?? 5000 });
  const remoteMta = hostname.slice(0, 300);

  const deliveries = metrics.counter("mda_deliveries_total", "Copies reported, by outcome", ["outcome"]);
  const duplicates = metrics.counter(
    "mda_duplicates_total",
    "Redelivered copies found already delivered (reported delivered again, not written)",
  );
  const writeSeconds = metrics.histogram(
    "mda_write_seconds",
    "Time to make one copy durable in Maildir (write, fsync, rename, directory fsync)",
    [],
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
  );
  const bytesWritten = metrics.counter("mda_bytes_written_total", "Bytes written into Maildirs");

  // a Redis outage would otherwise log once per copy
  let redisWarnedAt = 0;
  const redisWarn = (err: unknown, msg: string) => {
    if (Date.now() - redisWarnedAt < 10_000) return;
    redisWarnedAt = Date.now();
    log.warn({ err: (err as Error).message }, msg);
  };

  async function isDone(key: string): Promise<boolean> {
    try {
      return (await redis.exists(key)) > 0;
    } catch (err) {
      // the file check below still catches copies that are in new/
      redisWarn(err, "Redis unavailable for the duplicate check; relying on the Maildir");
      return false;
    }
  }

  async function markDone(key: string, path: string): Promise<void> {
    try {
      await redis.set(key, path, "EX", MARKER_TTL_SECONDS);
    } catch (err) {
      // the copy is durable already; without the marker only a redelivery after Dovecot moved it to cur/ duplicates
      redisWarn(err, "could not record deliveries in Redis");
    }
  }

  function logFailure(err: unknown, recipient: string): void {
    if (err instanceof BodyNotFoundError || err instanceof BodyIntegrityError) {
      log.error(
        { recipient, err: { name: err.name, message: err.message } },
        "message body unusable; deferring",
      );
      return;
    }
    const e = err as NodeJS.ErrnoException;
    if (typeof e?.code === "string") {
      log.error(
        {
          recipient,
          err: {
            code: e.code,
            errno: e.errno,
            syscall: e.syscall,
            path: e.path,
            dest: (e as { dest?: string }).dest,
          },
        },
        "Maildir write failed; deferring",
      );
      return;
    }
    log.error({ recipient, err: { name: e?.name, message: e?.message } }, "delivery failed; deferring");
  }

  /** The first bytes of a body too large to buffer: enough for its header section (at most 64 KiB). */
  async function headOf(request: LocalDeliveryRequest): Promise<Buffer> {
    const stream = await bodies.read(request.body);
    const chunks: Buffer[] = [];
    let size = 0;
    try {
      for await (const chunk of stream) {
        const b = chunk as Buffer;
        chunks.push(b);
        size += b.length;
        const head = Buffer.concat(chunks);
        if (size >= 64 * 1024 || head.includes("\r\n\r\n") || head.includes("\n\n")) break;
      }
    } finally {
      stream.destroy();
    }
    return Buffer.concat(chunks);
  }

  /** The domain's spamToJunk rule (directory, default on): a message marked as spam goes to Junk. */
  async function spamToJunk(rcpt: Recipient, head: () => Promise<Buffer>): Promise<boolean> {
    const domain = parseAddress(rcpt.mailbox)?.domain;
    if (!domain || !deps.directory().domainPolicy(domain).spamToJunk) return false;
    return markedAsSpam(await head());
  }

  async function copy(
    request: LocalDeliveryRequest,
    rcpt: Recipient,
    smallBody: () => Promise<Buffer>,
    head: () => Promise<Buffer>,
  ): Promise<CopyResult> {
    const header = deliveryHeader(request.mailFrom, rcpt.address);
    const size = header.length + request.body.size;
    const name = messageName(request.queueId, rcpt.address, hostname, size);
    const key = doneKey(request.queueId, rcpt.address);
    let folder: Folder | undefined;
    let quota: number | undefined;
    let reserved = false;
    try {
      if (await isDone(key)) {
        duplicates.inc();
        log.info({ recipient: rcpt.address }, "already delivered; reporting it again");
        return { outcome: "delivered", reply: replies.delivered("Delivered to maildir") };
      }
      const junk = await spamToJunk(rcpt, head);
      folder = junk ? await store.junk(rcpt.mailbox) : await store.folder(rcpt.mailbox, rcpt.folder);
      const path = relative(deps.maildirRoot, `${folder.dir}/new/${name}`);
      if (await store.delivered(folder.dir, name)) {
        duplicates.inc();
        await markDone(key, path);
        log.info({ recipient: rcpt.address, path }, "already delivered; reporting it again");
        return { outcome: "delivered", reply: replies.delivered("Delivered to maildir") };
      }
      quota = deps.directory().quota(rcpt.mailbox);
      if (!(await quotas.reserve(folder.maildir, quota, size))) {
        log.warn({ recipient: rcpt.address, quota, size }, "mailbox over quota; deferring");
        return { outcome: "deferred", reply: replies.mailboxFull(rcpt.address) };
      }
      reserved = true;
      const body =
        request.body.size <= MAX_BUFFERED_BODY ? await smallBody() : () => bodies.read(request.body);
      const started = performance.now();
      await store.write(folder.dir, name, { header, body });
      writeSeconds.observe((performance.now() - started) / 1000);
      bytesWritten.inc(size);
      await markDone(key, path);
      // a +tag whose folder does not exist and was not created (special-use name, or too many folders)
      const inbox =
        rcpt.folder !== undefined && folder.folder === undefined ? { tagFolder: rcpt.folder } : {};
      log.info(
        { recipient: rcpt.address, path, size, ...inbox, ...(junk ? { spam: true } : {}) },
        "delivered",
      );
      return { outcome: "delivered", reply: replies.delivered("Delivered to maildir") };
    } catch (err) {
      if (reserved && folder) quotas.release(folder.maildir, quota, size);
      if (err instanceof TmpInUseError) {
        log.warn({ recipient: rcpt.address }, "another worker is writing this copy; will retry the request");
        return { outcome: "busy", reason: "a copy is being written by another worker" };
      }
      logFailure(err, rcpt.address);
      return { outcome: "deferred", reply: replyForError(err) };
    }
  }

  /**
   * MDA_BACKEND=lmtp: one LMTP transaction per copy. Dovecot adds Return-Path (from MAIL FROM);
   * Delivered-To is prepended here, as in Maildir mode. Idempotence: the `mda:done` marker holds
   * Dovecot's 250 and is written before the status is published and the request acked, so a
   * redelivery (crash, nak, lost ack) reports that reply again instead of delivering twice.
   */
  async function lmtpCopy(
    lmtp: LmtpClient,
    request: LocalDeliveryRequest,
    rcpt: Recipient,
    smallBody: () => Promise<Buffer>,
  ): Promise<CopyResult> {
    const key = doneKey(request.queueId, rcpt.address);
    let marker: string | null;
    try {
      marker = await redis.get(key);
    } catch (err) {
      // unlike a Maildir, Dovecot cannot be asked whether it has the copy: wait for Redis
      redisWarn(err, "Redis unavailable for the duplicate check; LMTP deliveries wait for it");
      return { outcome: "busy", reason: "Redis is unavailable for the duplicate check" };
    }
    if (marker !== null) {
      duplicates.inc();
      log.info({ recipient: rcpt.address }, "already delivered; reporting it again");
      return {
        outcome: "delivered",
        reply: replyOfMarker(marker) ?? replies.delivered("Delivered over LMTP"),
      };
    }
    const header = Buffer.from(`Delivered-To: ${rcpt.address}\r\n`, "utf8");
    // a +tag folder goes to Dovecot as the address's detail (recipient_delimiter = +)
    const at = rcpt.mailbox.lastIndexOf("@");
    const to =
      rcpt.folder === undefined
        ? rcpt.mailbox
        : `${rcpt.mailbox.slice(0, at)}+${rcpt.folder}${rcpt.mailbox.slice(at)}`;
    const started = performance.now();
    let result: Awaited<ReturnType<LmtpClient["deliver"]>>;
    try {
      result = await lmtp.deliver({ from: request.mailFrom, to }, async () => {
        if (request.body.size <= MAX_BUFFERED_BODY) return Buffer.concat([header, await smallBody()]);
        const rest = await bodies.read(request.body);
        return Readable.from(
          (async function* () {
            yield header;
            yield* rest;
          })(),
          { objectMode: false },
        );
      });
    } catch (err) {
      // the body could not be read (our side): nothing was sent
      logFailure(err, rcpt.address);
      return { outcome: "deferred", reply: replies.localError() };
    }
    const r = result.reply;
    if (result.kind === "failed") {
      log.error(
        { recipient: rcpt.address, lmtp: lmtp.target, err: result.detail },
        "LMTP delivery failed; deferring",
      );
      return { outcome: "deferred", reply: r };
    }
    if (r.code < 300) {
      writeSeconds.observe((performance.now() - started) / 1000);
      bytesWritten.inc(header.length + request.body.size);
      await markDoneLmtp(key, r, rcpt.address);
      log.info(
        { recipient: rcpt.address, mailbox: to, reply: `${r.code} ${r.enhanced} ${r.text}` },
        "delivered",
      );
      return { outcome: "delivered", reply: r };
    }
    // 5xx (unknown user, 552 5.2.2 quota for good) bounces; 4xx (452 4.2.2 quota for now, 451) defers
    const outcome: StatusOutcome = isPermanent(r) ? "bounced" : "deferred";
    log.warn(
      { recipient: rcpt.address, mailbox: to, reply: `${r.code} ${r.enhanced} ${r.text}` },
      outcome === "bounced" ? "LMTP server refused the copy; bouncing" : "LMTP server deferred the copy",
    );
    return { outcome, reply: r };
  }

  async function markDoneLmtp(key: string, r: Reply, recipient: string): Promise<void> {
    // the only guard against a second copy after a crash: try a few times before giving up
    for (let i = 0; ; i++) {
      try {
        await redis.set(key, lmtpMarker(r), "EX", MARKER_TTL_SECONDS);
        return;
      } catch (err) {
        if (i >= 2) {
          log.error(
            { recipient, err: (err as Error).message },
            "could not record the LMTP delivery in Redis; should this request be redelivered, the copy would be delivered again",
          );
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 200 * (i + 1)));
      }
    }
  }

  async function report(
    request: LocalDeliveryRequest,
    rcpt: Recipient,
    result: StatusOutcome,
    r: Reply,
  ): Promise<void> {
    const status: RecipientStatus = {
      v: 1,
      queueId: request.queueId,
      dispatchId: request.dispatchId,
      recipient: rcpt.address,
      outcome: result,
      reply: r,
      attempt: rcpt.attempt,
      service: "mda",
      at: new Date().toISOString(),
      remoteMta,
    };
    await bus.publish(subjects.status(result), RecipientStatus, status, {
      msgId: statusMsgId(request.dispatchId, rcpt.address, result),
    });
    bus.emit({
      type: result,
      queueId: request.queueId,
      recipient: rcpt.address,
      reply: r,
      attempt: rcpt.attempt,
    });
  }

  async function handle(
    request: LocalDeliveryRequest,
    hctx?: Pick<HandlerContext, "attachment">,
  ): Promise<Outcome | void> {
    let small: Promise<Buffer> | undefined;
    const smallBody = () => {
      small ??= bodies.readBuffer(request.body, hctx?.attachment);
      return small;
    };
    // the header section, for the spamToJunk rule: read once per request
    let headRead: Promise<Buffer> | undefined;
    const head = () => {
      headRead ??= request.body.size <= MAX_BUFFERED_BODY ? smallBody() : headOf(request);
      return headRead;
    };
    const reports: Promise<void>[] = [];
    let busy: string | undefined;
    for (const rcpt of request.recipients) {
      const result = await inSpan(
        tracer,
        deps.lmtp ? "lmtp.deliver" : "maildir.write",
        {
          attributes: {
            [attr.queueId]: request.queueId,
            [attr.recipientDomain]: parseAddress(rcpt.address)?.domain,
            [attr.attempt]: rcpt.attempt,
            [attr.size]: request.body.size,
          },
        },
        async (span) => {
          const r = deps.lmtp
            ? await lmtpCopy(deps.lmtp, request, rcpt, smallBody)
            : await copy(request, rcpt, smallBody, head);
          span.setAttribute(attr.outcome, r.outcome);
          if (r.outcome !== "busy") {
            span.setAttribute(attr.replyCode, r.reply.code);
            span.setAttribute(attr.replyEnhanced, r.reply.enhanced);
          }
          return r;
        },
      );
      if (result.outcome === "busy") {
        busy = result.reason;
        continue;
      }
      deliveries.inc({ outcome: result.outcome });
      // publish while the next copy is written; the ack waits for all of them below (the catch
      // only marks the rejection handled meanwhile: allSettled still sees it)
      const published = report(request, rcpt, result.outcome, result.reply);
      published.catch(() => {});
      reports.push(published);
    }
    const settled = await Promise.allSettled(reports);
    const failed = settled.find((s) => s.status === "rejected");
    // the bus naks and JetStream redelivers; the duplicate checks make that safe
    if (failed) throw failed.reason;
    if (busy) return outcome.retry(staleTmpMs, busy);
  }

  return { handle, store };
}
