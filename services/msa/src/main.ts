import { runService } from "@mailpipe/service-kit";
import { msaConfig } from "./config.ts";
import { startMsa } from "./msa.ts";

await runService({
  name: "msa",
  config: msaConfig,
  redis: true,
  async start({ config, telemetry, bus, redis, readiness }) {
    if (!redis) throw new Error("msa needs Redis (REDIS_URL)");
    const msa = await startMsa({ config, telemetry, bus, redis });
    readiness("smtp", () => msa.listening);
    // leave the rest of SHUTDOWN_TIMEOUT for draining the bus and flushing telemetry
    return () => msa.close(Math.max(1000, config.SHUTDOWN_TIMEOUT - 5000));
  },
});
