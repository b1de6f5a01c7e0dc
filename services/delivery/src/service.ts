import { existsSync } from "node:fs";
import type { Bus } from "@mailpipe/bus";
import { RemoteDeliveryRequest } from "@mailpipe/contracts";
import { type DirectoryWatcher, watchDirectory } from "@mailpipe/directory";
import { createResolver } from "@mailpipe/dns";
import { DestinationSlots } from "@mailpipe/queue";
import type { Telemetry } from "@mailpipe/telemetry";
import type { Redis } from "ioredis";
import type { Config } from "./config.ts";
import { Dane } from "./dane.ts";
import { MtaSts } from "./mta-sts.ts";
import { createOutboundTls } from "./outbound-tls.ts";
import { ReportSigner } from "./report-dkim.ts";
import { dayOf, sendDailyReports, TlsReportStore } from "./tls-report.ts";
import { createWorker, type DeliveryWorker, trustedCas } from "./worker.ts";

/** How often a worker checks whether yesterday's TLS reports went out (one replica sends each). */
const REPORT_CHECK_MS = 10 * 60_000;

/** A handler's heartbeat stops after this long, so a transaction stuck beyond every timer is redelivered. */
const HEARTBEAT_FOR_MS = 60 * 60_000;

export interface RunningDelivery {
  worker: DeliveryWorker;
  /** stops taking requests, finishes the transactions in flight, then QUITs pooled sessions */
  stop(): Promise<void>;
  /** MTA-STS policies (MTA_STS=on, with Redis) */
  mtaSts?: MtaSts;
  /** TLS-RPT counts and the daily send (TLSRPT=on, with Redis); `send(day)` sends that day's reports now */
  tlsReports?: { store: TlsReportStore; send(day: string): Promise<string[]> };
}

/** Binds the shared "delivery" consumer; main.ts runs this inside runService, tests call it directly. */
export async function startDelivery({
  config,
  bus,
  telemetry,
  workerId,
  redis,
}: {
  config: Config;
  bus: Bus;
  telemetry: Telemetry;
  workerId?: string;
  /** where the router keeps the destination slots (the worker renews and checks them) */
  redis?: Redis | undefined;
}): Promise<RunningDelivery> {
  const log = telemetry.log;
  const ca = trustedCas(config.OUTBOUND_TLS_CA_FILE);
  const resolver = createResolver({ servers: config.DNS_SERVERS });
  const mtaSts =
    config.MTA_STS && redis
      ? new MtaSts({
          redis,
          resolver,
          log,
          ca,
          port: config.MTA_STS_PORT,
          timeoutMs: config.MTA_STS_FETCH_TIMEOUT,
          refreshAfterMs: config.MTA_STS_REFRESH_AFTER,
          blockLocalAddresses: config.SMTP_BLOCK_LOCAL_ADDRESSES,
        })
      : undefined;
  if (config.MTA_STS && !redis)
    log.warn("MTA_STS=on needs Redis (REDIS_URL) for its policy cache: MTA-STS is off");
  const store = config.TLSRPT && redis ? new TlsReportStore(redis, log) : undefined;
  // the reports' DKIM keys: the directory msa signs with (an invalid file stops the start, as in
  // every service that reads it; a missing one only leaves the reports unsigned)
  let directory: DirectoryWatcher | undefined;
  if (store && existsSync(config.DIRECTORY_FILE)) {
    directory = await watchDirectory(config.DIRECTORY_FILE, {
      onReload: () => log.info("directory reloaded (TLS report DKIM keys)"),
      onError: (err) => log.error({ err: err.message }, "directory file rejected; keeping the previous one"),
    });
  } else if (store) {
    log.warn(
      { directoryFile: config.DIRECTORY_FILE },
      "TLS-RPT: no directory file at DIRECTORY_FILE: TLS reports go out without a DKIM signature; mount the directory msa uses there",
    );
  }
  const dane = config.DANE
    ? new Dane({
        resolver: createResolver({ servers: config.DANE_RESOLVERS }),
        port: config.SMTP_REMOTE_PORT,
        log,
      })
    : undefined;
  const worker = createWorker({
    config,
    bus,
    bodies: await bus.bodies(),
    ...(redis ? { slots: new DestinationSlots(redis) } : {}),
    telemetry,
    ...(workerId ? { workerId } : {}),
    tls: createOutboundTls({
      rules: config.TLS_POLICY,
      verifyByDefault: config.SMTP_TLS_VERIFY,
      mtaSts,
      reports: store,
      dane,
      log,
    }),
  });
  const signer =
    store &&
    new ReportSigner({
      directory: () => directory?.current(),
      directoryFile: config.DIRECTORY_FILE,
      log,
    });
  const tlsReports = store && {
    store,
    send: (day: string) =>
      sendDailyReports(
        {
          store,
          resolver,
          bus,
          log,
          hostname: config.MAIL_HOSTNAME,
          organization: config.TLSRPT_ORGANIZATION || config.MAIL_HOSTNAME,
          contact: config.TLSRPT_CONTACT || `postmaster@${config.MAIL_HOSTNAME}`,
          signer,
        },
        day,
      ),
  };
  // yesterday's reports, once per day across the replicas (each domain is claimed in Redis)
  const reportTimer =
    tlsReports &&
    setInterval(() => {
      const yesterday = dayOf(new Date(Date.now() - 86_400_000));
      tlsReports
        .send(yesterday)
        .catch((err: Error) => log.warn({ err: err.message }, "TLS-RPT: sending failed"));
    }, REPORT_CHECK_MS);
  reportTimer?.unref();
  const sub = await bus.consume("delivery", RemoteDeliveryRequest, worker.handle, {
    maxInFlight: config.DELIVERY_CONCURRENCY,
    ackWaitMs: config.DELIVERY_ACK_WAIT,
    heartbeatForMs: HEARTBEAT_FOR_MS,
  });
  telemetry.log.info(
    {
      worker: worker.workerId,
      concurrency: config.DELIVERY_CONCURRENCY,
      port: config.SMTP_REMOTE_PORT,
    },
    "consuming delivery requests",
  );
  const obsolete = ["DESTINATION_CONCURRENCY", "DESTINATION_WAIT"].filter(
    (n) => process.env[n] !== undefined,
  );
  if (obsolete.length > 0) {
    telemetry.log.warn(
      { variables: obsolete },
      "no longer read: destination limits are cluster-wide now, set on the router (DESTINATION_CONNECTIONS, DESTINATION_RATE, DESTINATION_LIMITS)",
    );
  }
  if (!redis) {
    telemetry.log.warn("no Redis: destination slots are neither checked nor renewed by this worker");
  }
  if (!config.SMTP_BLOCK_LOCAL_ADDRESSES) {
    telemetry.log.warn(
      "SMTP_BLOCK_LOCAL_ADDRESSES=false: MX records may point this worker at internal hosts",
    );
  }
  return {
    worker,
    ...(mtaSts ? { mtaSts } : {}),
    ...(tlsReports ? { tlsReports } : {}),
    async stop() {
      if (reportTimer) clearInterval(reportTimer);
      await sub.stop();
      await worker.close();
      await mtaSts?.close();
      directory?.close();
    },
  };
}
