import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, stat, utimes, writeFile } from "node:fs/promises";
import { join, relative, resolve } from "node:path";
import { Readable } from "node:stream";
import { newQueueId, queueIdTime } from "@mailpipe/contracts";
import { type TempDir, tempDir } from "@mailpipe/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  countFolders,
  DirSyncer,
  deliveryHeader,
  encodeLocalPart,
  isReservedFolder,
  LruSet,
  MaildirStore,
  mailboxDir,
  markedAsSpam,
  messageName,
  TmpInUseError,
} from "./maildir.ts";
import { chooseIo, MaildirIo } from "./maildir-io.ts";

let dir: TempDir;
beforeEach(async () => {
  dir = await tempDir("mda-maildir");
});
afterEach(async () => {
  await dir.remove();
});

const content = (body: string | Buffer) => ({
  header: deliveryHeader("sender@remote.test", "alice@example.test"),
  body: Buffer.from(body),
});

describe("mailbox paths", () => {
  it("are <root>/<domain>/<local part lower-cased>/Maildir", () => {
    expect(mailboxDir("/mail", "Alice@Example.TEST")).toBe("/mail/example.test/alice/Maildir");
  });

  it("encode local parts that are unsafe as a path component, and stay inside the root", () => {
    for (const mailbox of [
      '"../etc"@example.test',
      '".."@example.test',
      '"a/b"@example.test',
      "50%off@x.test",
    ]) {
      const path = mailboxDir("/mail", mailbox);
      const domainDir = `/mail/${mailbox.slice(mailbox.lastIndexOf("@") + 1)}`;
      // <local>/Maildir: exactly one component for the local part, inside the domain's folder
      expect(relative(domainDir, path).split("/"), mailbox).toHaveLength(2);
      expect(resolve(path).startsWith(`${domainDir}/`), mailbox).toBe(true);
    }
    expect(encodeLocalPart("../etc")).toBe("%2E.%2Fetc");
    expect(encodeLocalPart(".")).toBe("%2E");
    expect(encodeLocalPart("..")).toBe("%2E.");
    expect(encodeLocalPart(".hidden")).toBe("%2Ehidden");
    expect(encodeLocalPart("a/b")).toBe("a%2Fb");
    expect(encodeLocalPart("nul\0x")).toBe("nul%00x");
    expect(encodeLocalPart("50%off")).toBe("50%25off");
    expect(encodeLocalPart("Bob.Smith")).toBe("bob.smith");
    // one-to-one: a literal "%2F" never meets an encoded "/"
    expect(encodeLocalPart("a%2Fb")).not.toBe(encodeLocalPart("a/b"));
  });

  it("keep very long encoded local parts under NAME_MAX and distinct", () => {
    const a = encodeLocalPart(`"${"/".repeat(120)}a"`);
    const b = encodeLocalPart(`"${"/".repeat(120)}b"`);
    expect(Buffer.byteLength(a)).toBeLessThanOrEqual(255);
    expect(a).not.toBe(b);
  });
});

describe("message names", () => {
  it("are deterministic per queue id and recipient and carry the size", () => {
    const q = newQueueId();
    const name = messageName(q, "Alice@example.test", "mx1.example.test", 1234);
    const hash = createHash("sha256").update("alice@example.test").digest("hex").slice(0, 10);
    expect(name).toBe(`${Math.floor(queueIdTime(q) / 1000)}.Q${q}R${hash}.mx1.example.test,S=1234`);
    expect(messageName(q, "alice@example.test", "mx1.example.test", 1234)).toBe(name);
    expect(messageName(q, "bob@example.test", "mx1.example.test", 1234)).not.toBe(name);
    expect(messageName(newQueueId(), "alice@example.test", "mx1.example.test", 1234)).not.toBe(name);
  });

  it("escape / : and , in the host name", () => {
    const name = messageName(newQueueId(), "a@example.test", "odd/host:2,x", 1);
    expect(name).toMatch(/\.odd\\057host\\0722\\054x,S=1$/);
    expect(name).not.toContain("/");
  });
});

describe("Maildir system calls", () => {
  it("go inline on a local filesystem and through the thread pool on any other, unless told", async () => {
    const local = await chooseIo("auto", dir.path);
    expect(local.filesystem).not.toMatch(/^0x|unknown/); // the test's temp folder is on a local disk
    expect(local.inline).toBe(true);
    expect(await chooseIo("auto", "/proc")).toMatchObject({ inline: false });
    expect(await chooseIo("threadpool", dir.path)).toMatchObject({ inline: false });
    expect(await chooseIo("inline", "/proc")).toMatchObject({ inline: true });
  });
});

describe.each([
  ["thread pool", false],
  ["inline", true],
])("MaildirStore (calls %s)", (_how, inline) => {
  const store = (
    opts: Partial<{
      staleTmpMs: number;
      syncer: DirSyncer;
      maxAutoFolders: number;
      readyCacheSize: number;
    }> = {},
  ) =>
    new MaildirStore({
      root: dir.path,
      fsync: true,
      staleTmpMs: 10_000,
      io: new MaildirIo(inline),
      ...opts,
    });

  it("creates tmp/new/cur with mode 0700 and writes 0600 files, header then body byte-exact", async () => {
    const s = store();
    const f = await s.folder("alice@example.test");
    expect(f.dir).toBe(join(dir.path, "example.test/alice/Maildir"));
    for (const sub of ["tmp", "new", "cur"]) {
      expect((await stat(join(f.dir, sub))).mode & 0o777).toBe(0o700);
    }
    const body = Buffer.from("Subject: hi\nbare LF\r\nCRLF\rCR only\r\n\r\nbody\n");
    const path = await s.write(f.dir, "n1,S=1", content(body));
    expect(path).toBe(join(f.dir, "new", "n1,S=1"));
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    const bytes = await readFile(path);
    expect(bytes.equals(Buffer.concat([content("").header, body]))).toBe(true);
    const head = "Return-Path: <sender@remote.test>\r\nDelivered-To: alice@example.test\r\n";
    expect(bytes.subarray(0, head.length).toString()).toBe(head);
    expect(await readdir(join(f.dir, "tmp"))).toEqual([]);
  });

  it("writes the null sender as Return-Path: <>", () => {
    expect(deliveryHeader("", "bob@example.test").toString()).toBe(
      "Return-Path: <>\r\nDelivered-To: bob@example.test\r\n",
    );
  });

  it("creates a Maildir++ folder with maildirfolder and subscribes it once", async () => {
    const s = store();
    const f = await s.folder("alice@example.test", "news");
    expect(f.dir).toBe(join(f.maildir, ".news"));
    for (const sub of ["tmp", "new", "cur"]) expect((await stat(join(f.dir, sub))).isDirectory()).toBe(true);
    expect((await stat(join(f.dir, "maildirfolder"))).size).toBe(0);
    await s.folder("alice@example.test", "lists");
    // a second store (another process) finds the folder complete and does not subscribe it again
    await store().folder("alice@example.test", "news");
    expect(await readFile(join(f.maildir, "subscriptions"), "utf8")).toBe("news\nlists\n");
  });

  it("never lets a +tag reach a special-use folder: INBOX instead, even when the folder exists", async () => {
    const s = store();
    const maildir = join(dir.path, "example.test/alice/Maildir");
    // Dovecot's own special-use folders, as it creates them
    for (const f of [".Trash", ".Sent", ".Junk", ".Drafts"]) {
      for (const sub of ["tmp", "new", "cur"]) await mkdir(join(maildir, f, sub), { recursive: true });
    }
    for (const tag of [
      "Trash",
      "trash",
      "SENT",
      "Junk",
      "spam",
      "Drafts",
      "archive",
      "INBOX",
      "INBOX.Trash",
      "inbox.sent",
    ]) {
      const f = await s.folder("alice@example.test", tag);
      expect(f.dir, tag).toBe(maildir);
      expect(f.folder, tag).toBeUndefined();
    }
    expect((await readdir(maildir)).filter((n) => n.startsWith(".")).sort()).toEqual([
      ".Drafts",
      ".Junk",
      ".Sent",
      ".Trash",
    ]);
    expect(existsSync(join(maildir, "subscriptions"))).toBe(false);
    expect(isReservedFolder("news")).toBe(false);
    expect(isReservedFolder("Trash-2024")).toBe(false);
  });

  it("creates +tag folders only below maxAutoFolders, and still delivers into ones that exist", async () => {
    const s = store({ maxAutoFolders: 3 });
    const maildir = join(dir.path, "example.test/alice/Maildir");
    // one folder the user made in the IMAP client
    for (const sub of ["tmp", "new", "cur"])
      await mkdir(join(maildir, ".Projects", sub), { recursive: true });
    expect((await s.folder("alice@example.test", "a")).folder).toBe("a");
    expect((await s.folder("alice@example.test", "b")).folder).toBe("b");
    // three folders now: more tags go to INBOX, and nothing is created or subscribed for them
    for (const tag of ["c", "d", "e"]) {
      const f = await s.folder("alice@example.test", tag);
      expect(f, tag).toEqual({ maildir, dir: maildir });
    }
    expect(await countFolders(maildir)).toBe(3);
    expect(await readFile(join(maildir, "subscriptions"), "utf8")).toBe("a\nb\n");
    // existing folders keep receiving, whether created by us or by the user
    expect((await s.folder("alice@example.test", "Projects")).dir).toBe(join(maildir, ".Projects"));
    expect((await s.folder("alice@example.test", "a")).dir).toBe(join(maildir, ".a"));
    // the limit is per mailbox
    expect((await s.folder("bob@example.test", "c")).folder).toBe("c");
  });

  it("does not exceed maxAutoFolders when many copies for new tags arrive at once", async () => {
    const s = store({ maxAutoFolders: 4 });
    const tags = Array.from({ length: 20 }, (_, i) => `t${i}`);
    const got = await Promise.all(tags.map((t) => s.folder("alice@example.test", t)));
    expect(got.filter((f) => f.folder !== undefined)).toHaveLength(4);
    expect(await countFolders(join(dir.path, "example.test/alice/Maildir"))).toBe(4);
  });

  it("with maxAutoFolders 0 creates no folder, but uses one that exists", async () => {
    const s = store({ maxAutoFolders: 0 });
    const maildir = join(dir.path, "example.test/alice/Maildir");
    expect(await s.folder("alice@example.test", "news")).toEqual({ maildir, dir: maildir });
    expect(await countFolders(maildir)).toBe(0);
    await mkdir(join(maildir, ".lists"));
    const lists = await s.folder("alice@example.test", "lists");
    expect(lists.dir).toBe(join(maildir, ".lists"));
    // completed like any folder of ours: tmp/new/cur and the maildirfolder marker
    for (const sub of ["tmp", "new", "cur"])
      expect((await stat(join(lists.dir, sub))).isDirectory()).toBe(true);
    await s.write(lists.dir, "n1", content("x"));
    expect(await readdir(join(lists.dir, "new"))).toEqual(["n1"]);
  });

  it("remembers a bounded number of prepared folders", async () => {
    const s = store({ readyCacheSize: 5 });
    for (let i = 0; i < 12; i++) await s.folder(`user${i}@example.test`, "news");
    expect(s.cachedFolders).toBe(5);
    // a forgotten one is prepared again from disk
    const f = await s.folder("user0@example.test", "news");
    await s.write(f.dir, "n1", content("x"));
    expect(await readdir(join(f.dir, "new"))).toEqual(["n1"]);
  });

  it("keeps an existing subscriptions file and adds a newline before appending", async () => {
    const maildir = join(dir.path, "example.test/bob/Maildir");
    await mkdir(maildir, { recursive: true });
    await writeFile(join(maildir, "subscriptions"), "V\t2\n\nArchive");
    await store().folder("bob@example.test", "news");
    expect(await readFile(join(maildir, "subscriptions"), "utf8")).toBe("V\t2\n\nArchive\nnews\n");
  });

  it("streams a body and removes the tmp file when the stream fails", async () => {
    const s = store();
    const f = await s.folder("alice@example.test");
    const failing = () =>
      Promise.resolve(
        Readable.from(
          (async function* () {
            yield Buffer.alloc(64 * 1024, 1);
            throw new Error("sha256 mismatch");
          })(),
        ),
      );
    await expect(s.write(f.dir, "n2", { header: Buffer.from("H\r\n"), body: failing })).rejects.toThrow(
      "sha256 mismatch",
    );
    expect(await readdir(join(f.dir, "tmp"))).toEqual([]);
    expect(await readdir(join(f.dir, "new"))).toEqual([]);
  });

  it("refuses to take over a fresh tmp file but replaces a stale one", async () => {
    const s = store({ staleTmpMs: 5_000 });
    const f = await s.folder("alice@example.test");
    await writeFile(join(f.dir, "tmp", "n3"), "partial from a live writer");
    await expect(s.write(f.dir, "n3", content("x"))).rejects.toBeInstanceOf(TmpInUseError);
    expect(await readFile(join(f.dir, "tmp", "n3"), "utf8")).toBe("partial from a live writer");

    const old = new Date(Date.now() - 60_000);
    await utimes(join(f.dir, "tmp", "n3"), old, old);
    await s.write(f.dir, "n3", content("whole"));
    expect((await readFile(join(f.dir, "new", "n3"))).toString()).toMatch(/whole$/);
    expect(await readdir(join(f.dir, "tmp"))).toEqual([]);
  });

  it("recreates a Maildir (and folder) that was removed behind its back", async () => {
    const s = store();
    const f = await s.folder("alice@example.test");
    const news = await s.folder("alice@example.test", "news");
    await dir.remove();
    await s.write(f.dir, "n4", content("again"));
    expect(await readdir(join(f.dir, "new"))).toEqual(["n4"]);
    await dir.remove();
    await s.write(news.dir, "n5", content("again"));
    expect(await readdir(join(news.dir, "new"))).toEqual(["n5"]);
    expect((await stat(join(news.dir, "maildirfolder"))).isFile()).toBe(true);
    expect(await readFile(join(f.maildir, "subscriptions"), "utf8")).toBe("news\n");
  });

  it("reports delivered() only for a file in new/", async () => {
    const s = store();
    const f = await s.folder("alice@example.test");
    expect(await s.delivered(f.dir, "n5")).toBe(false);
    await s.write(f.dir, "n5", content("x"));
    expect(await s.delivered(f.dir, "n5")).toBe(true);
  });
});

describe("LruSet", () => {
  it("forgets the least recently used entry beyond its size", () => {
    const set = new LruSet(2);
    set.add("a");
    set.add("b");
    expect(set.has("a")).toBe(true); // a is now the most recent
    set.add("c");
    expect(set.has("b")).toBe(false);
    expect(set.has("a")).toBe(true);
    expect(set.has("c")).toBe(true);
    expect(set.size).toBe(2);
  });
});

describe("DirSyncer (group commit)", () => {
  it("lets renames into one directory share an fsync, and never skips one", async () => {
    const calls: string[] = [];
    let release: () => void = () => {};
    const syncer = new DirSyncer({
      syncDir: (d) => {
        calls.push(d);
        return new Promise<void>((r) => {
          release = r;
        });
      },
    });
    const first = Array.from({ length: 20 }, () => syncer.sync("/a/new"));
    await new Promise((r) => setImmediate(r));
    expect(calls).toHaveLength(1); // 20 callers, one fsync
    // callers arriving while it runs must wait for another fsync: their rename may be after it started
    let lateDone = false;
    const late = syncer.sync("/a/new").then(() => {
      lateDone = true;
    });
    release();
    await Promise.all(first);
    expect(lateDone).toBe(false);
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    expect(calls).toHaveLength(2);
    release();
    await late;
    expect(syncer.syncs).toBe(2);
  });

  it("passes an fsync failure to every caller that shared it", async () => {
    const syncer = new DirSyncer({ syncDir: () => Promise.reject(new Error("EIO")) });
    const results = await Promise.allSettled([syncer.sync("/b"), syncer.sync("/b")]);
    expect(results.map((r) => r.status)).toEqual(["rejected", "rejected"]);
  });

  it("fsyncs a real directory", async () => {
    const syncer = new DirSyncer();
    await Promise.all([syncer.sync(dir.path), syncer.sync(dir.path)]);
    expect(syncer.syncs).toBe(1);
  });
});

describe("markedAsSpam", () => {
  const msg = (head: string) => Buffer.from(`${head}\r\n\r\nX-Spam: Yes (in the body: not a header)\r\n`);
  it("reads the spam filter's verdict from the header section only", () => {
    expect(markedAsSpam(msg("From: a@b.test\r\nX-Spam: Yes"))).toBe(true);
    expect(markedAsSpam(msg("X-Spam-Flag: YES\r\nSubject: x"))).toBe(true);
    expect(markedAsSpam(msg("X-Spam-Status: Yes, score=9.1\r\n required=5.0"))).toBe(true);
    expect(markedAsSpam(msg("x-spam:\r\n yes"))).toBe(true); // folded
    expect(markedAsSpam(msg("X-Spam-Status: No, score=0.1"))).toBe(false);
    expect(markedAsSpam(msg("X-Spam: No"))).toBe(false);
    expect(markedAsSpam(msg("X-Spam-Score: 12.0\r\nSubject: yes"))).toBe(false);
    expect(markedAsSpam(msg("Subject: hi"))).toBe(false);
    expect(markedAsSpam(Buffer.from("Subject: hi\n\nX-Spam: Yes\n"))).toBe(false);
  });
});
