import type { Readable, Writable } from "node:stream";

/** Where a command reads and writes: the real process, or buffers in tests. */
export interface Io {
  stdin: Readable & { isTTY?: boolean; setRawMode?: (raw: boolean) => unknown };
  stdout: Writable;
  stderr: Writable;
  env: NodeJS.ProcessEnv;
}

export class UsageError extends Error {
  override name = "UsageError";
}

/** An operator-facing failure: the message says what went wrong and what to do. */
export class CommandError extends Error {
  override name = "CommandError";
}

export function out(io: Io, line = ""): void {
  io.stdout.write(`${line}\n`);
}

/** The first line of a non-interactive stdin (how scripts pass a password). */
export async function readLine(stdin: Readable): Promise<string> {
  let buf = "";
  for await (const chunk of stdin) {
    buf += String(chunk);
    const nl = buf.indexOf("\n");
    if (nl >= 0) return buf.slice(0, nl).replace(/\r$/, "");
  }
  return buf.replace(/\r$/, "");
}

/** Asks for a secret on a terminal without echoing it. */
export async function promptHidden(io: Io, question: string): Promise<string> {
  const { stdin, stderr } = io;
  stderr.write(question);
  stdin.setRawMode?.(true);
  stdin.resume();
  try {
    return await new Promise<string>((resolve, reject) => {
      let value = "";
      const onData = (chunk: Buffer) => {
        for (const ch of chunk.toString("utf8")) {
          if (ch === "\r" || ch === "\n") {
            stdin.off("data", onData);
            stderr.write("\n");
            resolve(value);
            return;
          }
          if (ch === "\u0003") {
            stdin.off("data", onData);
            stderr.write("\n");
            reject(new CommandError("cancelled"));
            return;
          }
          if (ch === "\u007f" || ch === "\b") value = value.slice(0, -1);
          else value += ch;
        }
      };
      stdin.on("data", onData);
    });
  } finally {
    stdin.setRawMode?.(false);
    stdin.pause();
  }
}
