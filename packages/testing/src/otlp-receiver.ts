import { createServer } from "node:http";
import { gunzipSync } from "node:zlib";
import { waitFor } from "./process.ts";

/** A span as received over OTLP/HTTP (JSON), flattened for assertions. */
export interface ReceivedSpan {
  service: string;
  traceId: string;
  spanId: string;
  parentSpanId: string | undefined;
  name: string;
  kind: number;
  attributes: Record<string, string | number | boolean>;
  links: { traceId: string; spanId: string }[];
  startNs: bigint;
  status: number;
}

export interface OtlpReceiver {
  /** base endpoint for OTEL_EXPORTER_OTLP_ENDPOINT */
  url: string;
  spans: ReceivedSpan[];
  waitForSpans(predicate: (spans: ReceivedSpan[]) => boolean, timeoutMs?: number): Promise<ReceivedSpan[]>;
  stop(): Promise<void>;
}

// OTLP/JSON ids are hex by the spec; accept base64 too (protobuf-JSON mapping) to be safe.
function id(v: unknown): string {
  const s = String(v ?? "");
  if (s === "") return "";
  if (/^[0-9a-f]+$/i.test(s) && (s.length === 32 || s.length === 16)) return s.toLowerCase();
  return Buffer.from(s, "base64").toString("hex");
}

type AnyValue = {
  stringValue?: string;
  intValue?: string | number;
  doubleValue?: number;
  boolValue?: boolean;
};

function value(v: AnyValue | undefined): string | number | boolean {
  if (!v) return "";
  if (v.stringValue !== undefined) return v.stringValue;
  if (v.intValue !== undefined) return Number(v.intValue);
  if (v.doubleValue !== undefined) return v.doubleValue;
  if (v.boolValue !== undefined) return v.boolValue;
  return JSON.stringify(v);
}

function attrs(
  list: { key: string; value: AnyValue }[] | undefined,
): Record<string, string | number | boolean> {
  const out: Record<string, string | number | boolean> = {};
  for (const a of list ?? []) out[a.key] = value(a.value);
  return out;
}

/** An OTLP/HTTP trace receiver on loopback, standing in for a collector or Jaeger in tests. */
export async function startOtlpReceiver({
  host = "127.0.0.1",
}: {
  host?: string;
} = {}): Promise<OtlpReceiver> {
  const spans: ReceivedSpan[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      if (req.method !== "POST" || req.url !== "/v1/traces") {
        res.writeHead(404).end();
        return;
      }
      if (!String(req.headers["content-type"] ?? "").includes("json")) {
        res
          .writeHead(415, { "content-type": "text/plain" })
          .end("this test receiver speaks OTLP/HTTP JSON only\n");
        return;
      }
      try {
        let body = Buffer.concat(chunks);
        if (req.headers["content-encoding"] === "gzip") body = gunzipSync(body);
        const data = JSON.parse(body.toString("utf8")) as {
          resourceSpans?: {
            resource?: { attributes?: { key: string; value: AnyValue }[] };
            scopeSpans?: { spans?: Record<string, unknown>[] }[];
          }[];
        };
        for (const rs of data.resourceSpans ?? []) {
          const service = String(attrs(rs.resource?.attributes)["service.name"] ?? "");
          for (const ss of rs.scopeSpans ?? []) {
            for (const s of ss.spans ?? []) {
              const parent = id(s.parentSpanId);
              spans.push({
                service,
                traceId: id(s.traceId),
                spanId: id(s.spanId),
                parentSpanId: parent === "" ? undefined : parent,
                name: String(s.name),
                kind: Number(s.kind ?? 0),
                attributes: attrs(s.attributes as { key: string; value: AnyValue }[]),
                links: ((s.links as { traceId: string; spanId: string }[] | undefined) ?? []).map((l) => ({
                  traceId: id(l.traceId),
                  spanId: id(l.spanId),
                })),
                startNs: BigInt(String(s.startTimeUnixNano ?? "0")),
                status: Number((s.status as { code?: number } | undefined)?.code ?? 0),
              });
            }
          }
        }
        res.writeHead(200, { "content-type": "application/json" }).end("{}");
      } catch (err) {
        res.writeHead(400, { "content-type": "text/plain" }).end(String((err as Error).message));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  const addr = server.address();
  const port = typeof addr === "object" && addr ? addr.port : 0;
  return {
    url: `http://${host}:${port}`,
    spans,
    waitForSpans: (predicate, timeoutMs = 15_000) =>
      waitFor(() => (predicate(spans) ? spans : false), {
        timeoutMs,
        intervalMs: 100,
        message: "expected spans did not arrive",
      }),
    stop: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
