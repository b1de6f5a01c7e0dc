// How the Maildir store makes its system calls. Each asynchronous fs call is a round trip through
// libuv's thread pool: a hand-off and a wake-up on each side (measured with strace: about 37 futex
// calls per copy for the seven calls of one delivery, against 8 when they are inline). On a local
// filesystem open, write, close, rename and stat of a small file are cheap enough inline. fsync is
// different: it waits for the disk, so it always goes to the thread pool, where several run at once.
// On a network filesystem (NFS, CephFS, SMB, FUSE) every metadata call is a round trip to a server
// and would stall the event loop inline, so "auto" chooses by the filesystem's type.
import {
  close,
  closeSync,
  constants,
  fsync,
  open,
  openSync,
  rename,
  renameSync,
  stat,
  statfs,
  statSync,
  unlink,
  unlinkSync,
  writev,
  writevSync,
} from "node:fs";
import { promisify } from "node:util";

// the callback API works on plain descriptors (a promises FileHandle that is garbage collected
// would close its descriptor under us)
const openAsync = promisify(open);
const writevAsync = promisify(writev);
const closeAsync = promisify(close);
const renameAsync = promisify(rename);
const unlinkAsync = promisify(unlink);
const statAsync = promisify(stat);
const fsyncAsync = promisify(fsync);
const statfsAsync = promisify(statfs);

/** MAILDIR_IO: `auto` (inline on a local filesystem), `inline`, or `threadpool`. */
export type MaildirIoMode = "auto" | "inline" | "threadpool";

/** statfs f_type of filesystems where a metadata call stays on this machine (linux/magic.h). */
const LOCAL_FILESYSTEMS: Record<number, string> = {
  61267: "ext2/3/4",
  1481003842: "xfs",
  2435016766: "btrfs",
  16914836: "tmpfs",
  2035054128: "overlay",
  801189825: "zfs",
  4076150800: "f2fs",
  827541066: "jfs",
  1382369651: "reiserfs",
};

/**
 * Which way `auto` goes for the filesystem holding `root`: inline on the local filesystems above,
 * the thread pool on anything else (NFS, CephFS, SMB, FUSE, or a type it does not know).
 */
export async function chooseIo(
  mode: MaildirIoMode,
  root: string,
): Promise<{ inline: boolean; filesystem: string }> {
  let filesystem = "unknown";
  try {
    const type = (await statfsAsync(root)).type;
    filesystem = LOCAL_FILESYSTEMS[type] ?? `0x${type.toString(16)}`;
  } catch {
    // the root is checked (and created) by the caller; a statfs failure only means "not sure"
  }
  const local = Object.values(LOCAL_FILESYSTEMS).includes(filesystem);
  return { inline: mode === "inline" || (mode === "auto" && local), filesystem };
}

/** The calls a small copy needs, inline or through the thread pool. */
export class MaildirIo {
  readonly inline: boolean;

  constructor(inline: boolean) {
    this.inline = inline;
  }

  async exists(path: string): Promise<boolean> {
    if (this.inline) return statSync(path, { throwIfNoEntry: false }) !== undefined;
    try {
      await statAsync(path);
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
      throw err;
    }
  }

  /** Creates `path` exclusively (never through a symlink); resolves with its descriptor. */
  async createExclusive(path: string, mode: number): Promise<number> {
    const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;
    if (this.inline) return openSync(path, flags, mode);
    return openAsync(path, flags, mode);
  }

  /** Writes all of `buffers` at the descriptor's position. */
  async writeAll(fd: number, buffers: Buffer[]): Promise<void> {
    let rest = buffers.filter((b) => b.length > 0);
    while (rest.length > 0) {
      const written = this.inline ? writevSync(fd, rest) : (await writevAsync(fd, rest)).bytesWritten;
      let n = written;
      const next: Buffer[] = [];
      for (const b of rest) {
        if (n >= b.length) {
          n -= b.length;
          continue;
        }
        next.push(n > 0 ? b.subarray(n) : b);
        n = 0;
      }
      rest = next;
    }
  }

  /** fsync always waits in the thread pool: it blocks for as long as the disk takes. */
  sync(fd: number): Promise<void> {
    return fsyncAsync(fd);
  }

  async close(fd: number): Promise<void> {
    if (this.inline) return closeSync(fd);
    await closeAsync(fd);
  }

  async rename(from: string, to: string): Promise<void> {
    if (this.inline) return renameSync(from, to);
    await renameAsync(from, to);
  }

  async unlink(path: string): Promise<void> {
    if (this.inline) return unlinkSync(path);
    await unlinkAsync(path);
  }

  /** fsync of a directory, so a rename or a new entry in it survives a crash. */
  async syncDir(dir: string): Promise<void> {
    const flags = constants.O_RDONLY | constants.O_DIRECTORY;
    const fd = this.inline ? openSync(dir, flags) : await openAsync(dir, flags);
    try {
      await fsyncAsync(fd);
    } finally {
      await this.close(fd);
    }
  }
}
