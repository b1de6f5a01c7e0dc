// A real Dovecot 2.3 (Debian's dovecot-core, -lmtpd, -imapd, -sieve) for tests: LMTP on a loopback
// port and a unix socket, IMAP on a loopback port, its own config dir and passwd-file user database,
// each user's Sieve script, quotas. Runs as the current user; as root, mail belongs to `nobody` and
// the login processes run as `dovenull` (Dovecot refuses root for both). Never touches a system Dovecot.
import { type ChildProcess, spawn } from "node:child_process";
import { chmod, chown, mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { exitOf, LineBuffer, terminate, track, trackDir, untrackDir } from "./children.ts";
import { freePort, tempDir } from "./process.ts";
import { findBinary } from "./servers.ts";

const HOST = "127.0.0.1";

export interface DovecotUser {
  /** the login and the LMTP recipient: `user@domain` */
  address: string;
  /** IMAP password (plain text); default "secret" */
  password?: string;
  /** quota storage limit, e.g. "1K", "10M"; none when unset */
  quota?: string;
  /** answer a full mailbox with `452 4.2.2` (try later) instead of `552 5.2.2` */
  quotaTempfail?: boolean;
  /** the user's active Sieve script */
  sieve?: string;
}

export interface StartDovecotOptions {
  users: DovecotUser[];
  /** host:port where Dovecot sends Sieve rejections, redirects and vacation replies */
  submissionHost?: string;
  /** From: of rejection mails (default postmaster@<recipient domain>) */
  postmasterAddress?: string;
}

export interface DovecotHandle {
  /** lmtp://127.0.0.1:PORT */
  readonly lmtpUrl: string;
  /** unix:/…/lmtp */
  readonly lmtpSocketUrl: string;
  readonly imapPort: number;
  /** mail of user@domain is in <mailDir>/<domain>/<user>/Maildir */
  readonly mailDir: string;
  readonly pid: number | undefined;
  /** Dovecot's log so far */
  log(): Promise<string>;
  stop(): Promise<void>;
}

function greeting(port: number, prefix: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: HOST, port });
    let data = "";
    const done = (err?: Error) => {
      clearTimeout(timer);
      s.destroy();
      if (err) reject(err);
      else resolve();
    };
    const timer = setTimeout(() => done(new Error(`no greeting on port ${port}`)), 1000);
    s.on("error", done);
    s.on("end", () => done(new Error(`closed without a greeting on port ${port}`)));
    s.on("data", (c) => {
      data += c.toString();
      if (data.includes("\r\n")) {
        done(data.startsWith(prefix) ? undefined : new Error(`greeting ${JSON.stringify(data)}`));
      }
    });
  });
}

export async function startDovecot(options: StartDovecotOptions): Promise<DovecotHandle> {
  const binary = findBinary("dovecot");
  if (!binary || !findBinary("doveconf")) {
    throw new Error(
      "dovecot is not installed: run `. scripts/bootstrap.sh dovecot` (as root on Debian it installs dovecot-core, dovecot-lmtpd, dovecot-imapd and dovecot-sieve)",
    );
  }
  const tmp = await tempDir("mailpipe-dovecot");
  trackDir(tmp.path);
  const dir = tmp.path;
  const me = os.userInfo();
  // Dovecot refuses mail access as uid 0: as root, mail belongs to `nobody`
  const mailUser = me.uid === 0 ? "nobody" : me.username;
  const mailGroup = me.uid === 0 ? "nogroup" : String(me.gid);
  const mailDir = path.join(dir, "mail");
  const sieveDir = path.join(dir, "sieve");
  for (const d of ["run", "state", mailDir, sieveDir]) await mkdir(path.resolve(dir, d), { recursive: true });

  const lines: string[] = [];
  for (const u of options.users) {
    const [local, domain] = [u.address.slice(0, u.address.lastIndexOf("@")), u.address.split("@").pop()!];
    const extra = [
      u.quota ? `userdb_quota_rule=*:storage=${u.quota}` : "",
      u.quotaTempfail ? "userdb_quota_full_tempfail=yes" : "",
    ]
      .filter(Boolean)
      .join(" ");
    // user:password:uid:gid:gecos:home:shell:extra fields
    lines.push(`${u.address}:{PLAIN}${u.password ?? "secret"}::::::${extra}`);
    const userSieve = path.join(sieveDir, domain, local);
    await mkdir(userSieve, { recursive: true });
    if (u.sieve) await writeFile(path.join(userSieve, "active.sieve"), u.sieve);
  }
  await writeFile(path.join(dir, "users"), `${lines.join("\n")}\n`, { mode: 0o600 });
  if (me.uid === 0) {
    // mail processes run as nobody: they must get through the (0700) temp dir to mail/ and sieve/
    await chmod(dir, 0o711);
    const { uid, gid } = await idsOf("nobody");
    for (const d of [mailDir, sieveDir]) await chownTree(d, uid, gid);
  }

  const lmtpPort = await freePort(HOST);
  const imapPort = await freePort(HOST);
  const conf = `# written by packages/testing/src/dovecot.ts
instance_name = mailpipe-test-${path.basename(dir)}
base_dir = ${dir}/run
state_dir = ${dir}/state
log_path = ${dir}/dovecot.log
protocols = lmtp imap
listen = ${HOST}
default_login_user = ${me.uid === 0 ? "dovenull" : me.username}
default_internal_user = ${me.username}
default_internal_group = ${me.uid === 0 ? "root" : String(me.gid)}
mail_uid = ${mailUser}
mail_gid = ${mailGroup}
first_valid_uid = 1
mail_location = maildir:${mailDir}/%d/%n/Maildir
namespace inbox {
  inbox = yes
  separator = /
}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u ${dir}/users
}
userdb {
  driver = passwd-file
  args = username_format=%u ${dir}/users
  default_fields = uid=${mailUser} gid=${mailGroup} home=${mailDir}/%d/%n
}
service lmtp {
  inet_listener lmtp {
    address = ${HOST}
    port = ${lmtpPort}
  }
  unix_listener lmtp {
    mode = 0666
  }
}
service imap-login {
  inet_listener imap {
    address = ${HOST}
    port = ${imapPort}
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    port = 0
  }
}
service submission-login {
  inet_listener submission {
    port = 0
  }
}
${lmtpSettings()}
${options.submissionHost ? `submission_host = ${options.submissionHost}` : ""}
${options.postmasterAddress ? `postmaster_address = ${options.postmasterAddress}` : "postmaster_address = postmaster@%d"}
plugin {
  quota = maildir:User quota
  sieve = file:${sieveDir}/%d/%n;active=${sieveDir}/%d/%n/active.sieve
}
`;
  const confFile = path.join(dir, "dovecot.conf");
  await writeFile(confFile, conf);

  const output = new LineBuffer(40);
  const child: ChildProcess = spawn(binary, ["-F", "-c", confFile], { stdio: ["ignore", "pipe", "pipe"] });
  await new Promise<void>((resolve, reject) => {
    child.once("spawn", resolve);
    child.once("error", reject);
  });
  track(child);
  child.stdout?.on("data", (c: Buffer) => output.push(c));
  child.stderr?.on("data", (c: Buffer) => output.push(c));
  const readLog = () => readFile(path.join(dir, "dovecot.log"), "utf8").catch(() => "");
  const stop = async () => {
    await terminate(child, "SIGTERM", 5000);
    await tmp.remove();
    untrackDir(dir);
  };
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      output.end();
      const log = await readLog();
      await stop();
      throw new Error(`dovecot exited at start:\n${output.tail(20)}\n${log.slice(-2000)}`);
    }
    try {
      await Promise.all([greeting(lmtpPort, "220 "), greeting(imapPort, "* OK")]);
      break;
    } catch (err) {
      if (Date.now() > deadline) {
        await stop();
        throw new Error(`dovecot not ready after 15 s: ${(err as Error).message}\n${output.tail(20)}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  void exitOf(child);
  return {
    lmtpUrl: `lmtp://${HOST}:${lmtpPort}`,
    lmtpSocketUrl: `unix:${dir}/run/lmtp`,
    imapPort,
    mailDir,
    get pid() {
      return child.pid;
    },
    log: readLog,
    stop,
  };
}

/**
 * The LMTP part of a Dovecot configuration as mailpipe's mda expects it (deploy/dovecot/dovecot.conf
 * carries the same): Sieve and quota, Delivered-To left to mda, +detail to a folder.
 */
export function lmtpSettings(): string {
  return `mail_plugins = $mail_plugins quota
protocol lmtp {
  mail_plugins = $mail_plugins sieve
}
# mda writes Delivered-To (the envelope recipient before alias resolution) itself
lmtp_hdr_delivery_address = none
# RCPT TO:<user+folder@domain> files into "folder" when it exists
recipient_delimiter = +
lmtp_save_to_detail_mailbox = yes
# fileinto "Lists" creates Lists when needed
lda_mailbox_autocreate = yes
lda_mailbox_autosubscribe = yes
# a full mailbox is answered at RCPT TO, before the message is sent
lmtp_rcpt_check_quota = yes`;
}

async function idsOf(user: string): Promise<{ uid: number; gid: number }> {
  const passwd = await readFile("/etc/passwd", "utf8");
  const line = passwd.split("\n").find((l) => l.startsWith(`${user}:`));
  if (!line) throw new Error(`no user ${user} in /etc/passwd`);
  const f = line.split(":");
  return { uid: Number(f[2]), gid: Number(f[3]) };
}

async function chownTree(dir: string, uid: number, gid: number): Promise<void> {
  await chown(dir, uid, gid);
  for (const e of await readdir(dir, { recursive: true, withFileTypes: true })) {
    await chown(path.join(e.parentPath, e.name), uid, gid);
  }
}

// --- a small IMAP client: enough to read a mailbox in a test ------------------------------------

export interface ImapMessage {
  uid: number;
  flags: string[];
  raw: string;
}

/**
 * LOGIN, SELECT `mailbox`, UID FETCH 1:* (UID FLAGS BODY.PEEK[]), LOGOUT. Resolves with the
 * messages in UID order; rejects with the server's words when a command fails (e.g. no such mailbox).
 */
export function imapFetchAll(o: {
  port: number;
  user: string;
  password: string;
  mailbox?: string;
}): Promise<ImapMessage[]> {
  const mailbox = o.mailbox ?? "INBOX";
  const quote = (s: string) => `"${s.replace(/(["\\])/g, "\\$1")}"`;
  const commands = [
    `a1 LOGIN ${quote(o.user)} ${quote(o.password)}`,
    `a2 SELECT ${quote(mailbox)}`,
    "a3 UID FETCH 1:* (UID FLAGS BODY.PEEK[])",
    "a4 LOGOUT",
  ];
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: HOST, port: o.port });
    let buf = Buffer.alloc(0);
    let next = 0;
    const messages: ImapMessage[] = [];
    const fail = (err: Error) => {
      socket.destroy();
      reject(err);
    };
    socket.setTimeout(10_000, () => fail(new Error("IMAP: no answer within 10 s")));
    socket.on("error", fail);
    const send = () => socket.write(`${commands[next++]}\r\n`);
    socket.on("data", (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        const eol = buf.indexOf("\r\n");
        if (eol < 0) return;
        const line = buf.subarray(0, eol).toString("utf8");
        const literal = /\{(\d+)\}$/.exec(line);
        if (literal) {
          const size = Number(literal[1]);
          if (buf.length < eol + 2 + size) return; // wait for the whole literal
          const raw = buf.subarray(eol + 2, eol + 2 + size).toString("utf8");
          const rest = buf.subarray(eol + 2 + size);
          const close = rest.indexOf("\r\n");
          if (close < 0) return;
          const meta = line + rest.subarray(0, close).toString("utf8");
          messages.push({
            uid: Number(/UID (\d+)/.exec(meta)?.[1]),
            flags: (/FLAGS \(([^)]*)\)/.exec(meta)?.[1] ?? "").split(" ").filter(Boolean),
            raw,
          });
          buf = rest.subarray(close + 2);
          continue;
        }
        buf = buf.subarray(eol + 2);
        if (line.startsWith("* OK") && next === 0) send();
        else if (/^a[1-3] OK/.test(line)) send();
        else if (/^a\d (NO|BAD)/.test(line)) fail(new Error(`IMAP: ${line}`));
        else if (line.startsWith("a4 OK")) {
          socket.end();
          resolve(messages.sort((a, b) => a.uid - b.uid));
          return;
        }
      }
    });
  });
}
