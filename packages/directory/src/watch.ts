import { type FSWatcher, watch } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { Directory } from "./directory.ts";
import { DirectoryError } from "./errors.ts";

export interface WatchOptions {
  /** a new directory is in use */
  onReload?(directory: Directory): void;
  /** the file changed but cannot be used; the previous directory stays in use */
  onError?(error: Error): void;
  /** how often to compare the files' mtime, size and inode (default 2000 ms) */
  pollIntervalMs?: number;
  /** quiet time after a change before reading the file (default 200 ms) */
  debounceMs?: number;
  /** also listen for file-system events on the parent folder (default true) */
  fsWatch?: boolean;
}

export interface DirectoryWatcher {
  /** the directory in use: the latest one that loaded without errors */
  current(): Directory;
  /** reads the file now (as a change would); resolves once done */
  reload(): Promise<void>;
  /** stops watching */
  close(): void;
}

async function fingerprint(files: readonly string[]): Promise<string> {
  const parts = await Promise.all(
    files.map((f) =>
      stat(f).then(
        (s) => `${s.ino}:${s.size}:${s.mtimeMs}`,
        (err: NodeJS.ErrnoException) => `!${err.code ?? "error"}`,
      ),
    ),
  );
  return parts.join("|");
}

/** Everything a Directory was built from, to tell a real change from a touched file. */
function contentOf(text: string, dir: Directory): string {
  return [text, ...dir.domains().map((d) => dir.dkim(d)?.privateKey ?? "")].join("\0");
}

/**
 * Loads a directory file and keeps it current. Kubernetes updates a mounted ConfigMap or Secret by
 * swapping the `..data` symlink in the mount folder, which never changes the watched path itself, so
 * the parent folder is watched (inotify) and the files' mtime, size and inode are polled as a fallback
 * (also covering DKIM key files). Changes are debounced; a file that fails to parse or validate leaves
 * the previous directory in use and is reported once through onError.
 *
 * Rejects when the first load fails: a service must not start without its directory.
 */
export async function watchDirectory(file: string, opts: WatchOptions = {}): Promise<DirectoryWatcher> {
  const path = resolve(file);
  const pollMs = opts.pollIntervalMs ?? 2000;
  const debounceMs = opts.debounceMs ?? 200;

  let firstText: string;
  try {
    firstText = await readFile(path, "utf8");
  } catch (err) {
    throw new DirectoryError(path, [
      { path: "", message: `cannot read the file: ${(err as Error).message}` },
    ]);
  }
  let current = Directory.fromYaml(firstText, dirname(path), { file: path });
  let content = contentOf(firstText, current);
  let seen = await fingerprint(current.files);
  let lastFailure: string | undefined;
  let closed = false;
  let running: Promise<void> | undefined;
  let again = false;
  let timer: NodeJS.Timeout | undefined;
  let watcher: FSWatcher | undefined;

  const fail = (err: Error, key: string) => {
    if (key === lastFailure) return;
    lastFailure = key;
    opts.onError?.(err);
  };

  const check = async (): Promise<void> => {
    seen = await fingerprint(current.files);
    let text: string;
    try {
      text = await readFile(path, "utf8");
    } catch (err) {
      return fail(err as Error, `read ${(err as NodeJS.ErrnoException).code}`);
    }
    let next: Directory;
    try {
      next = Directory.fromYaml(text, dirname(path), { file: path });
    } catch (err) {
      return fail(err as Error, `${text}\0${(err as Error).message}`);
    }
    lastFailure = undefined;
    const nextContent = contentOf(text, next);
    if (closed || nextContent === content) return;
    current = next;
    content = nextContent;
    opts.onReload?.(next);
    seen = await fingerprint(next.files);
  };

  /** Runs check() one at a time; a change during a run triggers one more run. */
  const reload = (): Promise<void> => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      do {
        again = false;
        try {
          await check();
        } catch (err) {
          fail(err as Error, `unexpected ${(err as Error).message}`);
        }
      } while (again && !closed);
      running = undefined;
    })();
    return running;
  };

  const schedule = () => {
    if (closed) return;
    clearTimeout(timer);
    timer = setTimeout(() => void reload(), debounceMs);
    timer.unref();
  };

  const startWatcher = () => {
    if (opts.fsWatch === false || watcher || closed) return;
    try {
      watcher = watch(dirname(path), { persistent: false }, () => schedule());
      watcher.on("error", () => {
        // the folder went away or the watch broke: polling carries on and retries the watch
        watcher?.close();
        watcher = undefined;
      });
    } catch {
      watcher = undefined;
    }
  };
  startWatcher();

  const poll = setInterval(() => {
    startWatcher();
    if (running) return;
    void fingerprint(current.files).then((fp) => {
      if (fp !== seen) {
        seen = fp;
        schedule();
      }
    });
  }, pollMs);
  poll.unref();

  return {
    current: () => current,
    reload,
    close() {
      closed = true;
      clearInterval(poll);
      clearTimeout(timer);
      watcher?.close();
      watcher = undefined;
    },
  };
}
