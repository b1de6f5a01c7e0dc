// TLS stage: STARTTLS or implicit TLS from certificate files, and picking up a renewed certificate
// without a restart.
import type { Logger } from "@mailpipe/telemetry";
import type { SMTPServer, SMTPServerOptions } from "smtp-server";
import type { SmtpEdgeOptions } from "./options.ts";
import { loadTlsFiles, type TlsPair, type TlsWatcher, watchTlsFiles } from "./tls-files.ts";

/** The certificate pair, loaded and checked; undefined (with a warning) when no files are configured. */
export async function loadTls(options: SmtpEdgeOptions, log: Logger): Promise<TlsPair | undefined> {
  if (options.secure && !options.tls) {
    throw new Error("implicit TLS (secure) needs TLS_CERT_FILE and TLS_KEY_FILE");
  }
  const tlsPair = options.tls ? await loadTlsFiles(options.tls) : undefined;
  if (!tlsPair) {
    log.warn("TLS_CERT_FILE/TLS_KEY_FILE are not set: STARTTLS is not offered, mail arrives in clear text");
  }
  return tlsPair;
}

/** smtp-server options for TLS: without a certificate, STARTTLS is neither offered nor accepted. */
export function tlsOptions(options: SmtpEdgeOptions, tlsPair: TlsPair | undefined): SMTPServerOptions {
  return {
    secure: !!options.secure,
    ...(tlsPair ? { cert: tlsPair.cert, key: tlsPair.key } : { hideSTARTTLS: true }),
    disabledCommands: tlsPair ? [] : ["STARTTLS"],
  };
}

/** Reloads the certificate into the running server when its files change. */
export async function watchCertificate(
  server: SMTPServer,
  options: SmtpEdgeOptions,
  log: Logger,
): Promise<TlsWatcher | undefined> {
  if (!options.tls) return undefined;
  return watchTlsFiles(
    options.tls,
    (pair) => {
      server.updateSecureContext({ cert: pair.cert, key: pair.key });
      log.info({ certFile: options.tls?.certFile }, "TLS certificate reloaded");
    },
    {
      pollIntervalMs: options.tlsPollIntervalMs ?? 5000,
      onError: (err) =>
        log.error(
          { err: err.message },
          "TLS files changed but cannot be used; keeping the previous certificate",
        ),
    },
  );
}
