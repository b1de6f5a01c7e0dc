// createSmtpEdge: one SMTPServer assembled from its stages, each in its own file, in the order a
// session meets them:
//   connect.ts     greeting, connection limits, session span and time limit, connect hook, close
//   tls.ts         STARTTLS / implicit TLS, certificate reload
//   ehlo-auth.ts   ESMTP extensions, AUTH through the auth hook
//   mail-rcpt.ts   queue id and transaction span, SIZE against the memory budget, sender/recipient policy
//   data.ts        DATA time limit, intake, message hook, Received, durable acceptance
//   shutdown.ts    two-phase bounded close
// edge-context.ts holds the state they share; patches.ts the two smtp-server patches.
import type { AddressInfo } from "node:net";
import { SMTPServer, type SMTPServerOptions } from "smtp-server";
import { connectionHandlers, connectionOptions, logServerErrors } from "./connect.ts";
import { dataHandler } from "./data.ts";
import { EdgeContext } from "./edge-context.ts";
import { authHandler, ehloOptions } from "./ehlo-auth.ts";
import { smtpServerLogger } from "./logger-bridge.ts";
import { mailRcptHandlers } from "./mail-rcpt.ts";
import { MemoryBudget } from "./memory-budget.ts";
import { edgeMetrics } from "./metrics.ts";
import type { SmtpEdgeOptions } from "./options.ts";
import { installSmtpServerPatches, onReplies } from "./patches.ts";
import { shutdown } from "./shutdown.ts";
import { loadTls, tlsOptions, watchCertificate } from "./tls.ts";

export type { EdgeClient, EdgeHooks, MessageDecision, Transaction } from "./hooks.ts";
export type { SmtpEdgeOptions } from "./options.ts";

export interface SmtpEdge {
  readonly server: SMTPServer;
  /** the bound port, once listening */
  readonly port: number;
  readonly listening: boolean;
  /** connections open now */
  readonly connections: number;
  listen(): Promise<void>;
  /**
   * Two-phase shutdown, all within `timeoutMs`: stop listening, close idle sessions with
   * `421 4.3.2` and refuse new transactions; let transactions in progress finish until the last
   * `min(acceptTimeoutMs, timeoutMs / 2)`, then `421 4.3.2` those whose message has not been fully
   * received; messages fully received are still stored and answered until `timeoutMs`, then
   * `421 4.3.2` (and never queued). Resolves once every connection is gone.
   */
  close(opts?: { timeoutMs?: number }): Promise<void>;
}

/**
 * An SMTPServer with everything mx and msa share: ESMTP extensions, size and recipient limits,
 * STARTTLS or implicit TLS from renewable files, PROXY protocol, connection limits overall and per
 * IP, idle/DATA/session time limits, queue IDs, tracing and metrics, line-ending normalisation,
 * durable acceptance (250 only after store + publish) and a two-phase shutdown. The service brings
 * its policy as hooks.
 */
export async function createSmtpEdge(options: SmtpEdgeOptions): Promise<SmtpEdge> {
  installSmtpServerPatches();
  const { telemetry, hooks } = options;
  const { log } = telemetry;
  const budget =
    options.memoryBudget instanceof MemoryBudget
      ? options.memoryBudget
      : new MemoryBudget(options.memoryBudget ?? 512 * 1024 * 1024);
  if (budget.limit < options.maxMessageSize) {
    throw new Error(
      `SMTP_MEMORY_BUDGET (${budget.limit} bytes) is below MAX_MESSAGE_SIZE (${options.maxMessageSize} bytes): a message of the maximum size could never be accepted`,
    );
  }
  const edge = new EdgeContext(options, budget, edgeMetrics(telemetry.metrics, budget));
  const tlsPair = await loadTls(options, log);

  const connection = connectionOptions(options);
  const tls = tlsOptions(options, tlsPair);
  const ehlo = ehloOptions(options, hooks);
  const smtpOptions: SMTPServerOptions = {
    ...connection,
    ...tls,
    ...ehlo,
    disabledCommands: [...(tls.disabledCommands ?? []), ...(ehlo.disabledCommands ?? [])],
    maxRecipients: options.maxRecipients,
    logger: smtpServerLogger(log),
    ...connectionHandlers(edge),
    ...authHandler(edge),
    ...mailRcptHandlers(edge),
    ...dataHandler(edge),
  };

  const server = new SMTPServer(smtpOptions);
  edge.server = server;
  onReplies(server, (code) => edge.metrics.replies.inc({ code: String(code) }));
  logServerErrors(server, log);
  const tlsWatcher = await watchCertificate(server, options, log);

  let listening = false;
  let closing: Promise<void> | undefined;
  const smtpEdge: SmtpEdge = {
    server,
    get port() {
      const a = server.server.address() as AddressInfo | null;
      return a?.port ?? 0;
    },
    get listening() {
      return listening;
    },
    get connections() {
      return server.connections.size;
    },
    listen: () =>
      new Promise<void>((resolve, reject) => {
        server.server.once("error", reject);
        server.listen(options.port, options.host ?? "0.0.0.0", () => {
          server.server.off("error", reject);
          listening = true;
          log.info(
            {
              host: options.host ?? "0.0.0.0",
              port: smtpEdge.port,
              tls: !!tlsPair,
              secure: !!options.secure,
            },
            "SMTP listening",
          );
          resolve();
        });
      }),
    close: ({ timeoutMs = 25_000 } = {}) => {
      closing ??= (async () => {
        tlsWatcher?.close();
        listening = false;
        await shutdown(edge, timeoutMs);
      })();
      return closing;
    },
  };
  return smtpEdge;
}
