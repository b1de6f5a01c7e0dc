import { runService } from "@mailpipe/service-kit";
import { mxConfig } from "./config.ts";
import { startMx } from "./mx.ts";

await runService({
  name: "mx",
  config: mxConfig,
  async start({ config, telemetry, bus, readiness }) {
    const mx = await startMx({ config, telemetry, bus });
    readiness("smtp", () => mx.listening);
    // leave the rest of SHUTDOWN_TIMEOUT for draining the bus and flushing telemetry
    return () => mx.close(Math.max(1000, config.SHUTDOWN_TIMEOUT - 5000));
  },
});
