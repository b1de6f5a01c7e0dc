// Internal: every child process this kit starts, so none outlives the test process.
import type { ChildProcess } from "node:child_process";
import { rmSync } from "node:fs";

const children = new Set<ChildProcess>();
const dirs = new Set<string>();
let hooked = false;

function killAll(): void {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) {
      try {
        child.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
  }
  children.clear();
  for (const dir of dirs) {
    try {
      rmSync(dir, { recursive: true, force: true, maxRetries: 2 });
    } catch {
      // a child killed a moment ago may still be writing there; /tmp is cleaned eventually
    }
  }
  dirs.clear();
}

function onSignal(signal: NodeJS.Signals): void {
  killAll();
  // Listening for a signal replaces Node's default "die"; restore it when nobody else decides.
  if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
}

function hook(): void {
  if (hooked) return;
  hooked = true;
  // 'exit' listeners run synchronously, which kill() is.
  process.on("exit", killAll);
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.once(signal, onSignal);
}

export function track(child: ChildProcess): void {
  hook();
  children.add(child);
  child.once("exit", () => children.delete(child));
}

/** A temporary directory to delete at exit if its owner never got to it (e.g. after kill()). */
export function trackDir(dir: string): void {
  hook();
  dirs.add(dir);
}

export function untrackDir(dir: string): void {
  dirs.delete(dir);
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Resolves when the child has exited (at once if it already has). */
export function exitOf(child: ChildProcess): Promise<Exit> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  }
  return new Promise((resolve) => {
    child.once("exit", (code, signal) => resolve({ code, signal }));
  });
}

/** Sends `signal`, escalates to SIGKILL after `graceMs`, and waits for the exit. */
export async function terminate(child: ChildProcess, signal: NodeJS.Signals, graceMs: number): Promise<Exit> {
  const exited = exitOf(child);
  if (child.exitCode !== null || child.signalCode !== null) return exited;
  child.kill(signal);
  let timer: NodeJS.Timeout | undefined;
  const escalate = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, graceMs);
  });
  const first = await Promise.race([exited, escalate.then(() => undefined)]);
  clearTimeout(timer);
  if (first) return first;
  child.kill("SIGKILL");
  return exited;
}

/** Keeps the last `max` lines written to a stream, for error messages and logs. */
export class LineBuffer {
  readonly lines: string[] = [];
  private partial = "";
  private readonly max: number;
  private readonly onLine: ((line: string) => void) | undefined;

  constructor(max = Number.POSITIVE_INFINITY, onLine?: (line: string) => void) {
    this.max = max;
    this.onLine = onLine;
  }

  push(chunk: Buffer | string): void {
    const text = this.partial + chunk.toString();
    const parts = text.split("\n");
    this.partial = parts.pop() ?? "";
    for (const line of parts) this.add(line.replace(/\r$/, ""));
  }

  /** Flushes an unterminated last line (call when the stream ends). */
  end(): void {
    if (this.partial) this.add(this.partial);
    this.partial = "";
  }

  tail(n: number): string {
    return this.lines.slice(-n).join("\n");
  }

  private add(line: string): void {
    this.lines.push(line);
    this.onLine?.(line);
    if (this.lines.length > this.max) this.lines.splice(0, this.lines.length - this.max);
  }
}
