import { directoryFileSetting } from "@mailpipe/directory";
import { baseConfig, bool, duration } from "@mailpipe/service-kit";
import { z } from "zod";

/** mda's environment (README.md lists every variable with its default). */
export const config = baseConfig
  .extend({
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
    /** `maildir`: write into MAILDIR_ROOT; `lmtp`: hand each copy to LMTP_URL (Dovecot, with Sieve) */
    MDA_BACKEND: z.enum(["maildir", "lmtp"]).default("maildir"),
    /** `unix:/path/to/socket` or `lmtp://host:port`; required with MDA_BACKEND=lmtp */
    LMTP_URL: z.string().min(1).optional(),
    /** LMTP connections kept open at most (requests beyond wait for one) */
    LMTP_POOL_SIZE: z.coerce.number().int().min(1).max(256).default(8),
    /** how long each LMTP reply may take (connect, each command, the replies after DATA) */
    LMTP_TIMEOUT: duration("120s"),
  })
  .superRefine((c, ctx) => {
    if (c.MDA_BACKEND === "lmtp" && !c.LMTP_URL) {
      ctx.addIssue({
        code: "custom",
        path: ["LMTP_URL"],
        message: "MDA_BACKEND=lmtp needs LMTP_URL (unix:/path/to/socket or lmtp://host:port)",
      });
    }
  });
export type Config = z.infer<typeof config>;
