import { runService } from "@mailpipe/service-kit";
import { config } from "./config.ts";
import { startDelivery } from "./service.ts";

await runService({
  name: "delivery",
  config,
  // the cluster-wide destination slots: checked when a request arrives late, renewed while it runs
  redis: true,
  async start({ config, bus, telemetry, redis }) {
    const delivery = await startDelivery({ config, bus, telemetry, redis });
    return () => delivery.stop();
  },
});
