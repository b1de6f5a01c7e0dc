import { runService } from "@mailpipe/service-kit";
import { config } from "./config.ts";
import { startDelivery } from "./service.ts";

await runService({
  name: "delivery",
  config,
  async start({ config, bus, telemetry }) {
    const delivery = await startDelivery({ config, bus, telemetry });
    return () => delivery.stop();
  },
});
