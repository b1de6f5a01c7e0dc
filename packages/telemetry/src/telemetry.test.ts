import { Writable } from "node:stream";
import { context, propagation, ROOT_CONTEXT, trace } from "@opentelemetry/api";
import { describe, expect, it } from "vitest";
import { attr, createTelemetry, InMemorySpanExporter, inSpan, SpanKind, withQueueId } from "./index.ts";

function capture() {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _enc, cb) {
      for (const l of String(chunk).split("\n")) if (l) lines.push(JSON.parse(l));
      cb();
    },
  });
  return { lines, stream };
}

describe("telemetry", () => {
  it("log lines carry service, queueId, trace_id and span_id inside a span", async () => {
    const { lines, stream } = capture();
    const exporter = new InMemorySpanExporter();
    const t = createTelemetry({
      service: "mx",
      logDestination: stream,
      spanExporter: exporter,
      defaultMetrics: false,
    });
    t.log.info("starting");
    await withQueueId("01J00000000000000000000000", () =>
      inSpan(
        t.tracer,
        "smtp.data",
        { kind: SpanKind.SERVER, attributes: { [attr.queueId]: "x" } },
        async () => {
          t.log.info({ size: 10 }, "accepted");
        },
      ),
    );
    expect(lines[0]).toMatchObject({ service: "mx", level: "info", msg: "starting" });
    expect(lines[0]).not.toHaveProperty("queueId");
    const span = exporter.getFinishedSpans()[0]!;
    expect(lines[1]).toMatchObject({
      service: "mx",
      queueId: "01J00000000000000000000000",
      trace_id: span.spanContext().traceId,
      span_id: span.spanContext().spanId,
      msg: "accepted",
    });
    expect(span.name).toBe("smtp.data");
    expect(span.attributes[attr.queueId]).toBe("x");
  });

  it("still gives log lines a trace id when no spans are exported", async () => {
    const { lines, stream } = capture();
    const t = createTelemetry({ service: "mda", logDestination: stream, defaultMetrics: false, env: {} });
    expect(t.tracing.exporting).toBe(false);
    await inSpan(t.tracer, "maildir.write", {}, async (span) => {
      expect(span.isRecording()).toBe(false);
      t.log.info("written");
    });
    expect(lines[0]).toMatchObject({ msg: "written", trace_id: expect.stringMatching(/^[0-9a-f]{32}$/) });
  });

  it("never logs secrets", () => {
    const { lines, stream } = capture();
    const t = createTelemetry({ service: "msa", logDestination: stream, defaultMetrics: false });
    t.log.info({ password: "hunter2", auth: { user: "alice", password: "hunter2" } }, "login");
    expect(JSON.stringify(lines)).not.toContain("hunter2");
    expect(lines[0]).toMatchObject({ auth: { user: "alice", password: "[redacted]" } });
  });

  it("records a failed span without rethrowing differently", async () => {
    const exporter = new InMemorySpanExporter();
    const t = createTelemetry({ service: "router", spanExporter: exporter, defaultMetrics: false });
    await expect(
      inSpan(t.tracer, "route", {}, () => {
        throw new Error("boom");
      }),
    ).rejects.toThrow("boom");
    const span = exporter.getFinishedSpans().at(-1)!;
    expect(span.status).toMatchObject({ code: 2, message: "boom" });
  });

  it("exposes Prometheus metrics with the service label", async () => {
    const t = createTelemetry({ service: "mda", defaultMetrics: false });
    t.metrics.counter("messages_total", "messages", ["outcome"]).inc({ outcome: "delivered" }, 3);
    expect(t.metrics.counter("messages_total", "messages", ["outcome"])).toBe(
      t.metrics.counter("messages_total", "messages"),
    );
    const text = await t.metrics.text();
    expect(text).toContain('mailpipe_messages_total{outcome="delivered",service="mda"} 3');
  });
});

describe("logging to standard output", () => {
  /** Runs a script that logs through createLogger's default destination; returns its output lines. */
  async function run(script: string): Promise<{ lines: Record<string, unknown>[]; code: number | null }> {
    const { spawn } = await import("node:child_process");
    const { fileURLToPath } = await import("node:url");
    const logger = fileURLToPath(new URL("./logger.ts", import.meta.url));
    const child = spawn(
      process.execPath,
      ["--input-type=module", "-e", `import { createLogger } from ${JSON.stringify(logger)};\n${script}`],
      { stdio: ["ignore", "pipe", "ignore"] },
    );
    let out = "";
    child.stdout.on("data", (c: Buffer) => {
      out += c.toString();
    });
    const code = await new Promise<number | null>((resolve) => child.on("close", (c) => resolve(c)));
    return {
      lines: out
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l)),
      code,
    };
  }

  it("keeps every line through an exit and a crash, and writes a warning at once even when killed next", async () => {
    const exited = await run(
      `const log = createLogger({ service: "t" }); log.info("one"); log.info("two"); process.exit(3);`,
    );
    expect(exited.code).toBe(3);
    expect(exited.lines.map((l) => l.msg)).toEqual(["one", "two"]);

    const crashed = await run(
      `const log = createLogger({ service: "t" }); log.info("before the crash"); throw new Error("boom");`,
    );
    expect(crashed.code).toBe(1);
    expect(crashed.lines.map((l) => l.msg)).toEqual(["before the crash"]);

    // SIGKILL runs no exit handler: the warning (and what was buffered before it) is out already
    const killed = await run(
      `const log = createLogger({ service: "t" }); log.info("buffered"); log.warn("something is wrong"); process.kill(process.pid, "SIGKILL");`,
    );
    expect(killed.lines.map((l) => [l.level, l.msg])).toEqual([
      ["info", "buffered"],
      ["warn", "something is wrong"],
    ]);
  });

  it("a ratio sampler keeps a message's trace whole across services, or drops it whole", async () => {
    const env = { OTEL_TRACES_SAMPLER: "parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG: "0.5" };
    const mxSpans = new InMemorySpanExporter();
    const routerSpans = new InMemorySpanExporter();
    const mx = createTelemetry({
      service: "mx",
      logLevel: "silent",
      defaultMetrics: false,
      spanExporter: mxSpans,
      env,
    });
    const router = createTelemetry({
      service: "router",
      logLevel: "silent",
      defaultMetrics: false,
      spanExporter: routerSpans,
      env,
    });
    const traces: string[] = [];
    for (let i = 0; i < 60; i++) {
      // mx's root span, its context sent in the message's headers, the router's span from them
      const root = mx.tracer.startSpan("smtp.transaction", { kind: SpanKind.SERVER });
      const headers: Record<string, string> = {};
      propagation.inject(trace.setSpan(context.active(), root), headers);
      root.end();
      const parent = propagation.extract(ROOT_CONTEXT, headers);
      router.tracer.startSpan("process mail.v1.spool", { kind: SpanKind.CONSUMER }, parent).end();
      traces.push(root.spanContext().traceId);
    }
    const kept = (e: InMemorySpanExporter) =>
      new Set(e.getFinishedSpans().map((s) => s.spanContext().traceId));
    const inMx = kept(mxSpans);
    const inRouter = kept(routerSpans);
    for (const id of traces) expect(inRouter.has(id), id).toBe(inMx.has(id));
    // about half: neither all nor none (the chance of either is 2^-59)
    expect(inMx.size).toBeGreaterThan(0);
    expect(inMx.size).toBeLessThan(traces.length);
  });

  it("refuses an unknown sampler or ratio, saying what to use", () => {
    const make = (env: Record<string, string>) => () =>
      createTelemetry({
        service: "mx",
        logLevel: "silent",
        defaultMetrics: false,
        spanExporter: new InMemorySpanExporter(),
        env,
      });
    expect(make({ OTEL_TRACES_SAMPLER: "sometimes" })).toThrow(/use always_on, always_off, traceidratio/);
    expect(make({ OTEL_TRACES_SAMPLER: "traceidratio", OTEL_TRACES_SAMPLER_ARG: "2" })).toThrow(
      /a ratio between 0 and 1/,
    );
    expect(make({ OTEL_RESOURCE_ATTRIBUTES: "novalue" })).toThrow(
      /OTEL_RESOURCE_ATTRIBUTES: "novalue" is not key=value/,
    );
  });
});
