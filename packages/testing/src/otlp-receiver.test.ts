import { createTelemetry, SpanKind } from "@mailpipe/telemetry";
import { describe, expect, it } from "vitest";
import { startOtlpReceiver } from "./index.ts";

describe("OTLP receiver", () => {
  it("receives the spans a service exports with OTEL_EXPORTER_OTLP_ENDPOINT", async () => {
    const rx = await startOtlpReceiver();
    try {
      const t = createTelemetry({
        service: "router",
        logLevel: "silent",
        defaultMetrics: false,
        env: { OTEL_EXPORTER_OTLP_ENDPOINT: rx.url, OTEL_BSP_SCHEDULE_DELAY: "50" },
      });
      const parent = t.tracer.startSpan("route", {
        kind: SpanKind.CONSUMER,
        attributes: { "mail.queue_id": "Q" },
      });
      parent.end();
      await t.flush();
      const spans = await rx.waitForSpans((s) => s.some((x) => x.name === "route"));
      const s = spans.find((x) => x.name === "route")!;
      expect(s.service).toBe("router");
      expect(s.traceId).toBe(parent.spanContext().traceId);
      expect(s.spanId).toBe(parent.spanContext().spanId);
      expect(s.attributes["mail.queue_id"]).toBe("Q");
      expect(s.kind).toBe(5); // OTLP SPAN_KIND_CONSUMER
      await t.shutdown();
    } finally {
      await rx.stop();
    }
  });
});
