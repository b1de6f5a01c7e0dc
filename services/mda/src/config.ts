import { directoryFileSetting } from "@mailpipe/directory";
import { baseConfig, bool, duration } from "@mailpipe/service-kit";
import { z } from "zod";

/** mda's environment (README.md lists every variable with its default). */
export const config = baseConfig.extend({
  /** mailboxes live in <MAILDIR_ROOT>/<domain>/<local part>/Maildir */
  MAILDIR_ROOT: z.string().min(1).default("/var/lib/mailpipe/mail"),
  DIRECTORY_FILE: directoryFileSetting(),
  /** requests handled at once by this process */
  MDA_CONCURRENCY: z.coerce.number().int().min(1).max(1024).default(32),
  /** fsync files and directories before reporting delivered; turn off only for benchmarks */
  MDA_FSYNC: bool(true),
  /**
   * how a copy's open/write/close/rename/stat are made: `auto` inline on a local filesystem (ext4,
   * xfs, btrfs, tmpfs, overlay, zfs…) and through the thread pool on any other (NFS, CephFS, SMB,
   * FUSE); `inline`; `threadpool`. fsync always waits in the thread pool.
   */
  MAILDIR_IO: z.enum(["auto", "inline", "threadpool"]).default("auto"),
  MDA_ACK_WAIT: duration("60s"),
  /**
   * a +tag's folder is created only while the mailbox has fewer folders than this (0: never);
   * otherwise, and for special-use names, the copy goes to INBOX
   */
  MDA_MAX_AUTO_FOLDERS: z.coerce.number().int().min(0).max(100_000).default(50),
});
export type Config = z.infer<typeof config>;
