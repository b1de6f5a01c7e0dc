import { watchDirectory } from "@mailpipe/directory";
import { createResolver } from "@mailpipe/dns";
import { runService } from "@mailpipe/service-kit";
import { config } from "./config.ts";
import { startRouter } from "./router.ts";

await runService({
  name: "router",
  config,
  redis: true,
  async start({ config, telemetry, bus, redis, log }) {
    const directory = await watchDirectory(config.DIRECTORY_FILE, {
      onReload: (d) =>
        log.info({ domains: d.domains().length, users: d.users().length }, "directory reloaded"),
      onError: (err) => log.error({ err: err.message }, "directory file rejected; keeping the previous one"),
    });
    const router = await startRouter({
      config,
      telemetry,
      bus,
      redis: redis!,
      directory: () => directory.current(),
      resolver: createResolver({ servers: config.DNS_SERVERS }),
    });
    return async () => {
      await router.stop();
      directory.close();
    };
  },
});
