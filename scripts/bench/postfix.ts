// A private Postfix for the benchmarks: config rendered from scripts/bench/postfix/ into a folder of
// its own, smtpd on one loopback port, stopped by its master's PID. Never /etc/postfix.
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { chown, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { findBinary } from "@mailpipe/testing";

const exec = promisify(execFile);

export interface PostfixOptions {
  /** folder that holds everything (created; removed by stop()) */
  dir: string;
  /** smtpd's port on 127.0.0.1 */
  port: number;
  /** the sink's port on 127.0.0.2 (relay) */
  sinkPort: number;
}

export interface PrivatePostfix {
  dir: string;
  masterPid: number;
  /** files in bench@example.test's Maildir new/ */
  maildir: string;
  /** the log file (deliveries to the sink are its `status=sent` lines) */
  maillog: string;
  stop(): Promise<void>;
}

async function postfixIds(): Promise<{ uid: number; gid: number }> {
  const { stdout } = await exec("id", ["postfix"]);
  return { uid: Number(/uid=(\d+)/.exec(stdout)?.[1]), gid: Number(/gid=(\d+)/.exec(stdout)?.[1]) };
}

/** Writes main.cf and master.cf and the folders Postfix needs; returns the config folder. */
export async function renderPostfix(o: PostfixOptions): Promise<string> {
  const { uid, gid } = await postfixIds();
  const render = (t: string) =>
    t
      .replaceAll("{{DIR}}", o.dir)
      .replaceAll("{{PORT}}", String(o.port))
      .replaceAll("{{SINKPORT}}", String(o.sinkPort))
      .replaceAll("{{UID}}", String(uid))
      .replaceAll("{{GID}}", String(gid));
  const conf = join(o.dir, "conf");
  await mkdir(conf, { recursive: true });
  await mkdir(join(o.dir, "queue"), { recursive: true });
  await mkdir(join(o.dir, "data"), { recursive: true, mode: 0o700 });
  await mkdir(join(o.dir, "mail"), { recursive: true });
  await chown(join(o.dir, "data"), uid, gid);
  await chown(join(o.dir, "mail"), uid, gid);
  for (const f of ["main.cf", "master.cf"]) {
    const template = await readFile(new URL(`./postfix/${f}`, import.meta.url), "utf8");
    await writeFile(join(conf, f), render(template));
  }
  return conf;
}

function alive(pid: number): boolean {
  try {
    readFileSync(`/proc/${pid}/stat`);
    return true;
  } catch {
    return false;
  }
}

export async function startPostfix(o: PostfixOptions): Promise<PrivatePostfix> {
  const postfix = findBinary("postfix");
  if (!postfix) throw new Error("postfix is missing: it comes with Debian's postfix package");
  await rm(o.dir, { recursive: true, force: true });
  const conf = await renderPostfix(o);
  await exec(postfix, ["-c", conf, "start"]);
  const masterPid = Number((await readFile(join(o.dir, "queue", "pid", "master.pid"), "utf8")).trim());
  await new Promise((r) => setTimeout(r, 1000)); // its daemons settle
  return {
    dir: o.dir,
    masterPid,
    maildir: join(o.dir, "mail", "example.test", "bench", "Maildir", "new"),
    maillog: join(o.dir, "maillog"),
    async stop() {
      if (alive(masterPid)) process.kill(masterPid, "SIGTERM"); // master stops its daemons
      for (let i = 0; i < 100 && alive(masterPid); i++) await new Promise((r) => setTimeout(r, 100));
      await rm(o.dir, { recursive: true, force: true });
    },
  };
}
