// The README's first command: `npm start` brings the pipeline up, prints how to send a first
// message, that command delivers it to a Maildir a newcomer can find, and Ctrl-C stops everything.
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { readdir, readFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { promisify, stripVTControlCharacters } from "node:util";
import { freePort, repoRoot, type TempDir, tempDir, waitFor } from "@mailpipe/testing";
import { afterAll, describe, expect, it } from "vitest";

const exec = promisify(execFile);
let child: ChildProcess | undefined;
let data: TempDir | undefined;

afterAll(async () => {
  try {
    if (child?.pid) process.kill(-child.pid, "SIGKILL"); // whatever of the group is left
  } catch {
    // the group is gone already
  }
  await data?.remove();
});

describe("npm start", () => {
  it("starts everything, prints a first-message command that works, and stops cleanly on Ctrl-C", async () => {
    data = await tempDir("npm-start");
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      MAILPIPE_DATA_DIR: data.path,
      DEV_NATS_PORT: String(await freePort()),
      DEV_REDIS_PORT: String(await freePort()),
      DEV_DNS_PORT: String(await freePort()),
      MX_PORT: String(await freePort()),
      MSA_SUBMISSION_PORT: String(await freePort()),
      MSA_SUBMISSIONS_PORT: String(await freePort()),
    };
    for (const s of ["MX", "MSA", "ROUTER", "DELIVERY", "MDA"])
      env[`${s}_HTTP_PORT`] = String(await freePort());
    // npm as a newcomer runs it, in its own process group like a terminal's foreground job
    child = spawn("npm", ["start"], {
      cwd: repoRoot,
      env,
      detached: true,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    child.stdout?.on("data", (d) => {
      out += d.toString();
    });
    child.stderr?.on("data", (d) => {
      out += d.toString();
    });
    const exited = new Promise<{ code: number | null; signal: string | null }>((r) =>
      child!.once("exit", (code, signal) => r({ code, signal })),
    );
    await waitFor(() => out.includes("Ctrl-C stops everything"), {
      timeoutMs: 120_000,
      message: "npm start did not say it was ready",
    }).catch((err) => {
      throw new Error(`${(err as Error).message}\n${out}`);
    });

    const plain = stripVTControlCharacters(out);
    const send = /Send a first message[^\n]*\n\s+(swaks [^\n]+)/.exec(plain)?.[1];
    const read = /Read it:\n\s+ls (\S+)\//.exec(plain)?.[1];
    expect(send, plain).toBeDefined();
    expect(read, plain).toBeDefined();
    const { stdout } = await exec("bash", ["-c", send!], { cwd: repoRoot, env });
    expect(stdout).toMatch(/<- {2}250 /);

    const dir = resolve(repoRoot, read!);
    const files = await waitFor(
      async () => {
        const f = await readdir(dir).catch(() => [] as string[]);
        return f.length > 0 ? f : false;
      },
      { timeoutMs: 30_000, message: `nothing arrived in ${dir}` },
    );
    const message = await readFile(join(dir, files[0]!), "utf8");
    expect(message).toContain("Subject: first message");
    expect(message).toContain("Delivered-To: alice@example.test");
    expect(dir.startsWith(data.path)).toBe(true); // all data in the one data folder

    // and the operator CLI, as the README runs it, follows that message
    const { stdout: track } = await exec(
      "npm",
      ["run", "-s", "mailctl", "--", "track", "alice@example.test"],
      {
        cwd: repoRoot,
        env,
      },
    );
    expect(track).toMatch(/mx +received +alice@example\.test/);
    expect(track).toMatch(/mda +delivered +alice@example\.test/);

    // Ctrl-C: the terminal signals the whole foreground group (npm, its shell, the supervisor)
    process.kill(-child.pid!, "SIGINT");
    const exit = await Promise.race([exited, new Promise((r) => setTimeout(() => r("timeout"), 45_000))]);
    // npm itself dies of the SIGINT or passes on the supervisor's 0; either way it ends
    expect(
      exit === "timeout"
        ? exit
        : ((exit as { code: number | null; signal: string | null }).code ??
            (exit as { signal: string }).signal),
    ).toMatch(/^(0|SIGINT)$/);
    await waitFor(() => /\[mailpipe\] stopped/.test(out), {
      timeoutMs: 45_000,
      message: `no clean stop:\n${out}`,
    });
    expect(out).not.toMatch(/exited with code [1-9]/);
    // nothing it started is left running: no process still uses the data folder
    const { stdout: left } = await exec("pgrep", ["-af", data.path]).catch(() => ({ stdout: "" }));
    expect(left.trim()).toBe("");
  }, 240_000);
});
