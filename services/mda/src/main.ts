import { constants } from "node:fs";
import { access, mkdir } from "node:fs/promises";
import { LocalDeliveryRequest } from "@mailpipe/contracts";
import { watchDirectory } from "@mailpipe/directory";
import { runService } from "@mailpipe/service-kit";
import { config } from "./config.ts";
import { createDeliverer } from "./deliver.ts";
import { LmtpClient, parseLmtpUrl } from "./lmtp.ts";
import { chooseIo } from "./maildir-io.ts";

// fsync blocks a libuv thread for milliseconds; with the default 4 threads, 32 requests in flight
// would queue every stat, open and rename behind a few fsyncs. Set before the pool first starts.
process.env.UV_THREADPOOL_SIZE ??= String(
  Math.min(64, Math.max(4, Number(process.env.MDA_CONCURRENCY) || 32)),
);

await runService({
  name: "mda",
  config,
  redis: true,
  async start({ config, bus, redis, telemetry, log }) {
    if (!redis) throw new Error("mda needs Redis for its duplicate markers");
    const lmtp =
      config.MDA_BACKEND === "lmtp"
        ? new LmtpClient({
            // config's refinement makes LMTP_URL present with MDA_BACKEND=lmtp
            target: parseLmtpUrl(config.LMTP_URL ?? ""),
            name: config.MAIL_HOSTNAME,
            poolSize: config.LMTP_POOL_SIZE,
            timeoutMs: config.LMTP_TIMEOUT,
          })
        : undefined;
    if (!lmtp) {
      // fail at start, not on the first message, when the mail volume is missing or read-only
      await mkdir(config.MAILDIR_ROOT, { recursive: true, mode: 0o700 });
      await access(config.MAILDIR_ROOT, constants.W_OK);
    }
    const directory = await watchDirectory(config.DIRECTORY_FILE, {
      onReload: () => log.info({ file: config.DIRECTORY_FILE }, "directory reloaded"),
      onError: (err) => log.error({ err: err.message }, "directory file rejected; keeping the previous one"),
    });
    const io = lmtp
      ? { inline: false, filesystem: "none" }
      : await chooseIo(config.MAILDIR_IO, config.MAILDIR_ROOT);
    const deliverer = createDeliverer({
      maildirRoot: config.MAILDIR_ROOT,
      hostname: config.MAIL_HOSTNAME,
      fsync: config.MDA_FSYNC,
      ackWaitMs: config.MDA_ACK_WAIT,
      maxAutoFolders: config.MDA_MAX_AUTO_FOLDERS,
      inlineIo: io.inline,
      bus,
      bodies: await bus.bodies(),
      redis,
      directory: () => directory.current(),
      telemetry,
      ...(lmtp ? { lmtp } : {}),
    });
    if (!config.MDA_FSYNC) log.warn("MDA_FSYNC=false: deliveries are not crash-safe (benchmarks only)");
    const sub = await bus.consume("mda", LocalDeliveryRequest, deliverer.handle, {
      maxInFlight: config.MDA_CONCURRENCY,
      ackWaitMs: config.MDA_ACK_WAIT,
    });
    if (lmtp) log.info({ lmtp: lmtp.target, pool: config.LMTP_POOL_SIZE }, "delivering over LMTP");
    else
      log.info(
        {
          maildirRoot: config.MAILDIR_ROOT,
          concurrency: config.MDA_CONCURRENCY,
          filesystem: io.filesystem,
          io: io.inline ? "inline (fsync in the thread pool)" : "thread pool",
        },
        "delivering to Maildir",
      );
    return async () => {
      await sub.stop(); // finishes the requests in flight
      lmtp?.close();
      directory.close();
    };
  },
});
