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

  for (const protocol of ["http/protobuf", "http/json", "grpc"] as const) {
    it(`exports over ${protocol} as OTEL_EXPORTER_OTLP_PROTOCOL asks, with headers and resource attributes`, async () => {
      const rx = await startOtlpReceiver();
      try {
        const t = createTelemetry({
          service: "delivery",
          logLevel: "silent",
          defaultMetrics: false,
          env: {
            OTEL_EXPORTER_OTLP_PROTOCOL: protocol,
            OTEL_EXPORTER_OTLP_ENDPOINT: protocol === "grpc" ? rx.grpcUrl : rx.url,
            OTEL_EXPORTER_OTLP_HEADERS: "authorization=Bearer%20s3cret,x-tenant=mail",
            OTEL_RESOURCE_ATTRIBUTES: "deployment.environment=test,k8s.pod.name=delivery-0",
            OTEL_SERVICE_NAME: "mailpipe-delivery",
            OTEL_BSP_SCHEDULE_DELAY: "50",
          },
        });
        const span = t.tracer.startSpan("smtp.deliver", {
          kind: SpanKind.CLIENT,
          attributes: { "mail.attempt": 2 },
        });
        span.end();
        await t.flush();
        const spans = await rx.waitForSpans((s) => s.some((x) => x.name === "smtp.deliver"));
        const s = spans.find((x) => x.name === "smtp.deliver")!;
        expect(s.traceId).toBe(span.spanContext().traceId);
        expect(s.spanId).toBe(span.spanContext().spanId);
        expect(s.kind).toBe(3); // OTLP SPAN_KIND_CLIENT
        expect(s.attributes["mail.attempt"]).toBe(2);
        expect(s.service).toBe("mailpipe-delivery");
        const req = rx.requests.find((r) => r.spans > 0)!;
        expect(req.protocol).toBe(protocol);
        expect(req.contentType).toBe(
          {
            "http/protobuf": "application/x-protobuf",
            "http/json": "application/json",
            grpc: "application/grpc",
          }[protocol],
        );
        expect(req.headers.authorization).toBe("Bearer s3cret");
        expect(req.headers["x-tenant"]).toBe("mail");
        expect(req.resource["deployment.environment"]).toBe("test");
        expect(req.resource["k8s.pod.name"]).toBe("delivery-0");
        expect(req.resource["service.namespace"]).toBe("mailpipe");
        await t.shutdown();
      } finally {
        await rx.stop();
      }
    });
  }

  it("sends the traces endpoint as given, and refuses an unknown protocol with what to use", async () => {
    const rx = await startOtlpReceiver();
    try {
      const t = createTelemetry({
        service: "mx",
        logLevel: "silent",
        defaultMetrics: false,
        env: {
          OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "http/json",
          OTEL_EXPORTER_OTLP_PROTOCOL: "grpc",
          OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: `${rx.url}/v1/traces`,
          OTEL_BSP_SCHEDULE_DELAY: "50",
        },
      });
      t.tracer.startSpan("smtp.session").end();
      await t.flush();
      await rx.waitForSpans((s) => s.some((x) => x.name === "smtp.session"));
      expect(rx.requests[0]!.protocol).toBe("http/json");
      await t.shutdown();
    } finally {
      await rx.stop();
    }
    expect(() =>
      createTelemetry({
        service: "mx",
        logLevel: "silent",
        defaultMetrics: false,
        env: { OTEL_EXPORTER_OTLP_PROTOCOL: "thrift", OTEL_EXPORTER_OTLP_ENDPOINT: "http://127.0.0.1:1" },
      }),
    ).toThrow(/use http\/protobuf \(the default\), http\/json or grpc/);
  });
});
