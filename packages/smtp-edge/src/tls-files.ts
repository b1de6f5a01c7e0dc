import { readFile, stat } from "node:fs/promises";
import { createSecureContext } from "node:tls";

export interface TlsFiles {
  certFile: string;
  keyFile: string;
}

export interface TlsPair {
  cert: Buffer;
  key: Buffer;
}

export class TlsFilesError extends Error {
  override name = "TlsFilesError";
}

/** Reads a certificate chain and its key (PEM) and checks that they belong together. */
export async function loadTlsFiles({ certFile, keyFile }: TlsFiles): Promise<TlsPair> {
  let cert: Buffer;
  let key: Buffer;
  try {
    [cert, key] = await Promise.all([readFile(certFile), readFile(keyFile)]);
  } catch (err) {
    throw new TlsFilesError(`cannot read TLS_CERT_FILE/TLS_KEY_FILE: ${(err as Error).message}`, {
      cause: err,
    });
  }
  try {
    createSecureContext({ cert, key });
  } catch (err) {
    // the message names the problem (bad PEM, key does not match) and never holds key material
    throw new TlsFilesError(
      `TLS certificate ${certFile} and key ${keyFile} are unusable: ${(err as Error).message}`,
      {
        cause: err,
      },
    );
  }
  return { cert, key };
}

async function fingerprint({ certFile, keyFile }: TlsFiles): Promise<string> {
  const parts = await Promise.all(
    [certFile, keyFile].map((f) =>
      stat(f).then(
        (s) => `${s.ino}:${s.size}:${s.mtimeMs}`,
        (err: NodeJS.ErrnoException) => `!${err.code ?? "error"}`,
      ),
    ),
  );
  return parts.join("|");
}

export interface TlsWatcher {
  close(): void;
}

/**
 * Polls the certificate and key files (stat follows symlinks, so a Kubernetes Secret's `..data`
 * swap and cert-manager renewals are seen) and calls `onChange` with each new pair that loads. A
 * pair that does not load (mid-rotation: new cert, old key) keeps the previous one in use and is
 * reported through `onError`; the next change of either file tries again.
 */
export async function watchTlsFiles(
  files: TlsFiles,
  onChange: (pair: TlsPair) => void,
  { pollIntervalMs = 5000, onError }: { pollIntervalMs?: number; onError?: (err: Error) => void } = {},
): Promise<TlsWatcher> {
  let seen = await fingerprint(files);
  let busy = false;
  const timer = setInterval(() => {
    if (busy) return;
    busy = true;
    void (async () => {
      const now = await fingerprint(files);
      if (now === seen) return;
      seen = now;
      try {
        onChange(await loadTlsFiles(files));
      } catch (err) {
        onError?.(err as Error);
      }
    })().finally(() => {
      busy = false;
    });
  }, pollIntervalMs);
  timer.unref();
  return { close: () => clearInterval(timer) };
}
