import { createHash } from "node:crypto";
import { constants } from "node:fs";
import { lstat, mkdir, open, readdir, readFile, stat, unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import type { Readable } from "node:stream";
import { parseAddress, queueIdTime } from "@mailpipe/contracts";
import { MaildirIo } from "./maildir-io.ts";

/**
 * Maildir delivery (https://cr.yp.to/proto/maildir.html, Dovecot's Maildir++ for folders):
 * write tmp/<name>, fsync, rename to new/<name>, fsync new/. The name is a function of the queue ID and
 * the recipient, so a redelivered request finds its earlier copy instead of writing a second one.
 */

const DIR_MODE = 0o700;
const FILE_MODE = 0o600;
const SUBDIRS = ["tmp", "new", "cur"] as const;

/** Another worker is writing the same copy right now (its tmp file is fresh). */
export class TmpInUseError extends Error {
  override name = "TmpInUseError";
}

/** A mailbox address that cannot name a Maildir (the contract should have refused it). */
export class MailboxPathError extends Error {
  override name = "MailboxPathError";
}

function percent(ch: string): string {
  return [...Buffer.from(ch, "utf8")]
    .map((b) => `%${b.toString(16).toUpperCase().padStart(2, "0")}`)
    .join("");
}

/**
 * A local part as one safe path component: `%`, `/`, NUL and other control characters are
 * percent-encoded, as is a leading dot (which also covers `.` and `..`). Encoding `%` itself keeps
 * the mapping one-to-one, so two mailboxes never share a folder.
 */
export function encodeLocalPart(local: string): string {
  let out = "";
  for (const ch of local.toLowerCase()) out += /^[%/\p{Cc}]$/u.test(ch) ? percent(ch) : ch;
  if (out.startsWith(".")) out = `%2E${out.slice(1)}`;
  // NAME_MAX is 255 bytes; quoted local parts can be longer once encoded
  if (Buffer.byteLength(out) > 200) {
    const digest = createHash("sha256").update(out).digest("hex").slice(0, 16);
    let head = "";
    for (const ch of out) {
      if (Buffer.byteLength(head + ch) > 160) break;
      head += ch;
    }
    out = `${head}%~${digest}`; // `%~` never appears in an untruncated encoding
  }
  return out;
}

/** `<root>/<domain>/<local part>/Maildir` of a mailbox owner `user@domain`. */
export function mailboxDir(root: string, mailbox: string): string {
  const parsed = parseAddress(mailbox);
  if (!parsed || !/^[a-z0-9][a-z0-9.-]*$/.test(parsed.domain)) {
    throw new MailboxPathError(`${JSON.stringify(mailbox)} is not a mailbox address`);
  }
  return join(root, parsed.domain, encodeLocalPart(parsed.local), "Maildir");
}

/**
 * Folder names a sender must not reach with a +tag (RFC 6154 special-use and INBOX itself): mail
 * dropped there would look sent or drafted by the owner, or be hidden in the trash or spam folder.
 */
const RESERVED_FOLDERS = new Set(["inbox", "trash", "junk", "spam", "sent", "drafts", "archive"]);

/** Where mail marked as spam goes (RFC 6154 \\Junk; the name Dovecot's and most clients' defaults use). */
export const JUNK_FOLDER = "Junk";

/**
 * Whether a message's header section says a spam filter judged it spam: `X-Spam: Yes` (rspamd),
 * `X-Spam-Flag: YES` or `X-Spam-Status: Yes, …` (SpamAssassin style). Only the header section of
 * `head` (the message's first bytes) is read.
 */
export function markedAsSpam(head: Buffer): boolean {
  let end = head.indexOf("\r\n\r\n");
  if (end < 0) end = head.indexOf("\n\n");
  const section = head.subarray(0, end < 0 ? head.length : end).toString("latin1");
  const unfolded = section.replace(/\r?\n[ \t]+/g, " ");
  return /^(x-spam|x-spam-flag|x-spam-status)[ \t]*:[ \t]*yes\b/im.test(unfolded);
}

/** Whether a +tag names a special-use folder, also in Dovecot's `INBOX.<name>` form (any case). */
export function isReservedFolder(tag: string): boolean {
  const name = tag.toLowerCase();
  return RESERVED_FOLDERS.has(name.startsWith("inbox.") ? name.slice("inbox.".length) : name);
}

/** How many Maildir++ folders (`.<name>` directories) a Maildir has. */
export async function countFolders(maildir: string): Promise<number> {
  try {
    const entries = await readdir(maildir, { withFileTypes: true });
    return entries.filter(
      (e) => e.isDirectory() && e.name.startsWith(".") && e.name !== "." && e.name !== "..",
    ).length;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return 0;
    throw err;
  }
}

async function isDirectory(path: string): Promise<boolean> {
  return stat(path).then(
    (s) => s.isDirectory(),
    () => false,
  );
}

/** A set that forgets its least recently used entries beyond `max`. */
export class LruSet {
  readonly #max: number;
  readonly #entries = new Set<string>();

  constructor(max: number) {
    this.#max = max;
  }

  get size(): number {
    return this.#entries.size;
  }

  has(key: string): boolean {
    if (!this.#entries.has(key)) return false;
    // Set keeps insertion order: re-inserting makes it the most recently used
    this.#entries.delete(key);
    this.#entries.add(key);
    return true;
  }

  add(key: string): void {
    this.#entries.delete(key);
    this.#entries.add(key);
    if (this.#entries.size > this.#max) this.#entries.delete(this.#entries.values().next().value!);
  }

  delete(key: string): void {
    this.#entries.delete(key);
  }
}

/** Maildir's escapes for the host part of a name (`,` too: Maildir++ reads `,S=` after it). */
export function escapeHostname(host: string): string {
  return host.replaceAll("/", "\\057").replaceAll(":", "\\072").replaceAll(",", "\\054");
}

/**
 * `<seconds>.Q<queueId>R<sha256(recipient)[:10]>.<host>,S=<size>`: unique per (queue ID, recipient),
 * the same on every redelivery, and with the size Dovecot's quota reads without a stat().
 */
export function messageName(queueId: string, recipient: string, hostname: string, size: number): string {
  const seconds = Math.floor(queueIdTime(queueId) / 1000);
  const r = createHash("sha256").update(recipient.toLowerCase()).digest("hex").slice(0, 10);
  return `${seconds}.Q${queueId}R${r}.${escapeHostname(hostname)},S=${size}`;
}

/** The lines local delivery prepends (RFC 5321 §4.4 Return-Path, and Delivered-To). */
export function deliveryHeader(mailFrom: string, address: string): Buffer {
  return Buffer.from(`Return-Path: <${mailFrom}>\r\nDelivered-To: ${address}\r\n`, "utf8");
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

interface DirQueue {
  waiting: { resolve: () => void; reject: (err: unknown) => void }[];
  running: boolean;
}

/**
 * Group commit for directory fsyncs: callers whose rename finished before an fsync of that directory
 * started share it. Calls arriving while one runs wait for the next, which covers all of them.
 */
export class DirSyncer {
  readonly #queues = new Map<string, DirQueue>();
  readonly #syncDir: (dir: string) => Promise<void>;
  readonly #windowMs: number;
  /** fsyncs actually issued (for tests and metrics) */
  syncs = 0;

  constructor(opts: { windowMs?: number; syncDir?: (dir: string) => Promise<void> } = {}) {
    this.#windowMs = opts.windowMs ?? 0;
    this.#syncDir = opts.syncDir ?? fsyncDir;
  }

  sync(dir: string): Promise<void> {
    let q = this.#queues.get(dir);
    if (!q) {
      q = { waiting: [], running: false };
      this.#queues.set(dir, q);
    }
    const queue = q;
    const done = new Promise<void>((resolve, reject) => queue.waiting.push({ resolve, reject }));
    if (!queue.running) void this.#run(dir, queue);
    return done;
  }

  async #run(dir: string, q: DirQueue): Promise<void> {
    q.running = true;
    while (q.waiting.length > 0) {
      // let renames finishing in the same turn (or within the window) join this fsync
      await new Promise((r) => (this.#windowMs > 0 ? setTimeout(r, this.#windowMs) : setImmediate(r)));
      const batch = q.waiting.splice(0);
      try {
        this.syncs++;
        await this.#syncDir(dir);
        for (const w of batch) w.resolve();
      } catch (err) {
        for (const w of batch) w.reject(err);
      }
    }
    q.running = false;
    this.#queues.delete(dir);
  }
}

export interface MaildirOptions {
  root: string;
  /** fsync files and directories (off only for benchmarks) */
  fsync: boolean;
  /** a tmp file older than this belongs to a writer that died; younger, to one still at work */
  staleTmpMs: number;
  syncer?: DirSyncer;
  /**
   * MDA_MAX_AUTO_FOLDERS: a +tag folder is created only while the mailbox has fewer folders than
   * this (0: never); otherwise the copy goes to INBOX. Default 50.
   */
  maxAutoFolders?: number;
  /** how many prepared Maildirs and folders are remembered (default 10000) */
  readyCacheSize?: number;
  /** how the copy's system calls are made (default: through the thread pool) */
  io?: MaildirIo;
}

/** The bytes of one copy: the delivery header, then the body from memory or from a stream. */
export interface Content {
  header: Buffer;
  body: Buffer | (() => Promise<Readable>);
}

/** A Maildir (or a Maildir++ folder of one) ready to take messages. */
export interface Folder {
  /** the mailbox's Maildir root (holds the folders, for quota) */
  maildir: string;
  /** where messages go: the Maildir root, or `<root>/.<folder>` */
  dir: string;
  /** the Maildir++ folder used; absent for INBOX (also when a +tag's folder was not created) */
  folder?: string;
}

/** Writes messages into Maildirs under one root, creating mailboxes and folders on first use. */
export class MaildirStore {
  readonly root: string;
  readonly #fsync: boolean;
  readonly #staleTmpMs: number;
  readonly #syncer: DirSyncer;
  readonly #io: MaildirIo;
  readonly #maxAutoFolders: number;
  /**
   * folders known to exist with tmp/new/cur, so the common case costs no mkdir; bounded, as every
   * mailbox and folder ever delivered to would otherwise stay in memory (a forgotten one only costs
   * its mkdirs again)
   */
  readonly #ready: LruSet;
  readonly #locks = new Map<string, Promise<unknown>>();

  constructor(opts: MaildirOptions) {
    this.root = opts.root;
    this.#fsync = opts.fsync;
    this.#staleTmpMs = opts.staleTmpMs;
    const io = opts.io ?? new MaildirIo(false);
    this.#io = io;
    this.#syncer = opts.syncer ?? new DirSyncer({ syncDir: (d) => io.syncDir(d) });
    this.#maxAutoFolders = opts.maxAutoFolders ?? 50;
    this.#ready = new LruSet(opts.readyCacheSize ?? 10_000);
  }

  /** Maildirs and folders remembered as prepared (bounded by `readyCacheSize`). */
  get cachedFolders(): number {
    return this.#ready.size;
  }

  /**
   * Where a copy for `mailbox` (and its +tag `folder`) goes, created when missing. Anyone can send
   * to any +tag, so a tag's folder is used when it exists, and created only when it is no
   * special-use name and the mailbox has fewer than `maxAutoFolders` folders; otherwise INBOX.
   */
  async folder(mailbox: string, folder?: string): Promise<Folder> {
    const maildir = mailboxDir(this.root, mailbox);
    const name = folder === undefined || isReservedFolder(folder) ? undefined : folder;
    if (name !== undefined) {
      const dir = join(maildir, `.${name}`);
      if (this.#ready.has(dir) || (await isDirectory(dir))) {
        await this.#prepare(maildir, name);
        return { maildir, dir, folder: name };
      }
      if (this.#maxAutoFolders > 0) {
        // one creation per mailbox at a time, so concurrent copies cannot all slip under the limit
        const created = await this.#locked(maildir, async () => {
          if (!(await isDirectory(dir)) && (await countFolders(maildir)) >= this.#maxAutoFolders)
            return false;
          await this.#prepare(maildir, name);
          return true;
        });
        if (created) return { maildir, dir, folder: name };
      }
    }
    await this.#prepare(maildir, undefined);
    return { maildir, dir: maildir };
  }

  /** The mailbox's Junk folder (spam filed by the domain's spamToJunk rule), created when missing. */
  async junk(mailbox: string): Promise<Folder> {
    const maildir = mailboxDir(this.root, mailbox);
    await this.#prepare(maildir, JUNK_FOLDER);
    return { maildir, dir: join(maildir, `.${JUNK_FOLDER}`), folder: JUNK_FOLDER };
  }

  /** Whether `new/<name>` is there; if so, makes sure its directory entry is on disk. */
  async delivered(dir: string, name: string): Promise<boolean> {
    if (!(await this.#io.exists(join(dir, "new", name)))) return false;
    // an earlier attempt may have died between its rename and its directory fsync
    if (this.#fsync) await this.#syncer.sync(join(dir, "new"));
    return true;
  }

  /**
   * tmp/<name> (exclusive create, 0600) → write → fsync → rename to new/<name> → fsync new/.
   * Resolves with the final path once the copy is durable; on failure no file is left in tmp/.
   */
  async write(dir: string, name: string, content: Content): Promise<string> {
    const io = this.#io;
    const tmp = join(dir, "tmp", name);
    const final = join(dir, "new", name);
    let fd: number | undefined;
    let stream: Readable | undefined;
    let created = false;
    let renamed = false;
    try {
      fd = await this.#createTmp(dir, tmp);
      created = true;
      if (typeof content.body === "function") {
        await io.writeAll(fd, [content.header]);
        stream = await content.body();
        for await (const chunk of stream) await io.writeAll(fd, [chunk as Buffer]);
      } else {
        await io.writeAll(fd, [content.header, content.body]);
      }
      if (this.#fsync) await io.sync(fd);
      const closing = fd;
      fd = undefined;
      await io.close(closing);
      await io.rename(tmp, final);
      renamed = true;
      if (this.#fsync) await this.#syncer.sync(join(dir, "new"));
      return final;
    } finally {
      stream?.destroy();
      if (fd !== undefined) await io.close(fd).catch(() => {});
      if (created && !renamed) await io.unlink(tmp).catch(() => {});
    }
  }

  async #createTmp(dir: string, tmp: string): Promise<number> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#io.createExclusive(tmp, FILE_MODE);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (attempt >= 3) throw err;
        if (code === "ENOENT") {
          // the folder was removed behind our back (a deleted mailbox): create it again
          const isFolder = basename(dir).startsWith(".");
          const maildir = isFolder ? dirname(dir) : dir;
          this.#ready.delete(dir);
          this.#ready.delete(maildir);
          await this.#prepare(maildir, isFolder ? basename(dir).slice(1) : undefined);
          continue;
        }
        if (code !== "EEXIST") throw err;
        const age = await lstat(tmp).then(
          (s) => Date.now() - s.mtimeMs,
          () => Number.POSITIVE_INFINITY,
        );
        if (age < this.#staleTmpMs) {
          throw new TmpInUseError(`${tmp} is being written by another worker (${Math.round(age)} ms old)`, {
            cause: err,
          });
        }
        // left by a writer that died: the request came back to us because its ack wait ran out
        await unlink(tmp).catch(() => {});
      }
    }
  }

  async #prepare(maildir: string, folder: string | undefined): Promise<void> {
    if (!this.#ready.has(maildir)) await this.#ensureSubdirs(maildir);
    if (folder === undefined) return;
    const dir = join(maildir, `.${folder}`);
    if (this.#ready.has(dir)) return;
    // the maildirfolder file goes last: it marks a folder that is complete and subscribed
    const marker = join(dir, "maildirfolder");
    const complete = await stat(marker).then(
      () => true,
      () => false,
    );
    if (!complete) {
      await this.#ensureSubdirs(dir, false);
      await this.#subscribe(maildir, folder);
      const fh = await open(marker, constants.O_WRONLY | constants.O_CREAT, FILE_MODE);
      await fh.close();
    }
    this.#ready.add(dir);
  }

  async #ensureSubdirs(dir: string, remember = true): Promise<void> {
    for (const sub of SUBDIRS) await this.#mkdirDurable(join(dir, sub));
    if (remember) this.#ready.add(dir);
  }

  /** mkdir -p, then fsync the parents of what it created so the new directories survive a crash. */
  async #mkdirDurable(path: string): Promise<void> {
    const first = await mkdir(path, { recursive: true, mode: DIR_MODE });
    if (!first || !this.#fsync) return;
    const top = dirname(first);
    for (let d = dirname(path); ; d = dirname(d)) {
      await this.#io.syncDir(d);
      if (d === top || d === dirname(d)) break;
    }
  }

  /** Adds a folder to Dovecot's `subscriptions` (one name a line; both of its formats allow appending). */
  async #subscribe(maildir: string, folder: string): Promise<void> {
    const file = join(maildir, "subscriptions");
    await this.#locked(file, async () => {
      let text = "";
      try {
        text = await readFile(file, "utf8");
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
      }
      if (text.split("\n").includes(folder)) return;
      const sep = text === "" || text.endsWith("\n") ? "" : "\n";
      // O_APPEND: a short append is atomic, so replicas adding different folders do not clobber each other
      const fh = await open(file, constants.O_WRONLY | constants.O_CREAT | constants.O_APPEND, FILE_MODE);
      try {
        await fh.writeFile(`${sep}${folder}\n`);
      } finally {
        await fh.close();
      }
    });
  }

  async #locked<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const before = this.#locks.get(key) ?? Promise.resolve();
    const run = before.then(fn, fn);
    const tail = run.catch(() => {});
    this.#locks.set(key, tail);
    try {
      return await run;
    } finally {
      if (this.#locks.get(key) === tail) this.#locks.delete(key);
    }
  }
}
