import type { Bus } from "@mailpipe/bus";
import { type DirectoryWatcher, watchDirectory } from "@mailpipe/directory";
import {
  ContentFilter,
  createSmtpEdge,
  edgeLimits,
  filterSettings,
  type SmtpEdge,
  type SmtpEdgeOptions,
} from "@mailpipe/smtp-edge";
import type { Telemetry } from "@mailpipe/telemetry";
import type { Redis } from "ioredis";
import { AuthGuard } from "./auth-guard.ts";
import type { MsaConfig } from "./config.ts";
import { DkimSigner } from "./dkim-signer.ts";
import { MessageRateLimiter } from "./rate-limit.ts";
import { createSubmissionPolicy } from "./submission.ts";

export interface MsaDeps {
  config: MsaConfig;
  telemetry: Telemetry;
  bus: Bus;
  redis: Redis;
}

export interface Msa {
  /** the submission listener (STARTTLS) */
  submission: SmtpEdge;
  /** the submissions listener (implicit TLS) */
  submissions: SmtpEdge;
  directory: DirectoryWatcher;
  readonly listening: boolean;
  /** stop taking connections, let transactions finish within `timeoutMs`, close */
  close(timeoutMs: number): Promise<void>;
}

/** The submission service: two listeners (587 STARTTLS, 465 implicit TLS) sharing one policy. */
export async function startMsa({ config, telemetry, bus, redis }: MsaDeps): Promise<Msa> {
  const { log, metrics } = telemetry;
  const directory = await watchDirectory(config.DIRECTORY_FILE, {
    onReload: (dir) =>
      log.info({ users: dir.users().length, domains: dir.domains().length }, "directory reloaded"),
    onError: (err) => log.error({ err: err.message }, "directory file rejected; keeping the previous one"),
  });

  const policy = createSubmissionPolicy({
    directory: () => directory.current(),
    guard: new AuthGuard(redis, {
      windowMs: config.AUTH_FAIL_WINDOW,
      slowdownAfter: config.AUTH_FAIL_SLOWDOWN_AFTER,
      delayStepMs: config.AUTH_FAIL_DELAY_STEP,
      maxDelayMs: config.AUTH_FAIL_DELAY_MAX,
      limitIp: config.AUTH_FAIL_LIMIT_IP,
      limitUser: config.AUTH_FAIL_LIMIT_USER,
      lockoutMs: config.AUTH_LOCKOUT,
    }),
    rate: new MessageRateLimiter(redis, { limit: config.RATE_MESSAGES_PER_HOUR, windowMs: 3_600_000 }),
    signer: new DkimSigner({ log, metrics }),
    log,
    metrics,
    hostname: config.MAIL_HOSTNAME,
    recipientsPerMessage: config.RATE_RECIPIENTS_PER_MESSAGE,
    lockedCloseAfter: config.AUTH_LOCKED_CLOSE_AFTER,
  });

  // rspamd when RSPAMD_URL is set: it is told the authenticated user (and RSPAMD_SETTINGS_ID), and only
  // its refusals act here; the message, DKIM-signed already, is not changed
  const filterOptions = filterSettings(config, { modify: false });
  const filter = filterOptions ? new ContentFilter(filterOptions, telemetry) : undefined;
  if (filter)
    log.info(
      {
        url: filter.client.url.origin,
        failMode: filterOptions?.failMode,
        settingsId: filterOptions?.settingsId,
      },
      "content filter: rspamd",
    );

  const common: Omit<SmtpEdgeOptions, "port" | "secure"> = {
    service: "msa",
    hostname: config.MAIL_HOSTNAME,
    telemetry,
    bus,
    hooks: policy.hooks,
    host: config.MSA_HOST,
    tls: { certFile: config.TLS_CERT_FILE, keyFile: config.TLS_KEY_FILE },
    ...edgeLimits(config),
    useProxy: config.MSA_PROXY_PROTOCOL,
    // ours answers first (with its metric); smtp-server's own check stays as the backstop
    maxRecipients: config.RATE_RECIPIENTS_PER_MESSAGE + 1,
    hideClientInReceived: !config.MSA_RECEIVED_CLIENT_DETAILS,
    authUserInReceived: config.MSA_RECEIVED_AUTH_USER,
    filter,
  };

  const edges: SmtpEdge[] = [];
  try {
    for (const [port, secure] of [
      [config.MSA_SUBMISSION_PORT, false],
      [config.MSA_SUBMISSIONS_PORT, true],
    ] as const) {
      const edge = await createSmtpEdge({ ...common, port, secure });
      policy.attach(edge);
      edges.push(edge);
      await edge.listen();
    }
  } catch (err) {
    await Promise.all(edges.map((e) => e.close({ timeoutMs: 0 })));
    filter?.close();
    directory.close();
    throw err;
  }
  const [submission, submissions] = edges as [SmtpEdge, SmtpEdge];

  return {
    submission,
    submissions,
    directory,
    get listening() {
      return submission.listening && submissions.listening;
    },
    async close(timeoutMs) {
      await Promise.all([submission.close({ timeoutMs }), submissions.close({ timeoutMs })]);
      filter?.close();
      directory.close();
    },
  };
}
