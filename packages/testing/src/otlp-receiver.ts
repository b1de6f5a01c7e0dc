import { createServer } from "node:http";
import { gunzipSync } from "node:zlib";
import * as grpc from "@grpc/grpc-js";
import { waitFor } from "./process.ts";

/** A span as received over OTLP (HTTP JSON, HTTP protobuf or gRPC), flattened for assertions. */
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

/** One export request as it arrived: how it was encoded and with which headers. */
export interface ReceivedRequest {
  protocol: "http/json" | "http/protobuf" | "grpc";
  contentType: string;
  headers: Record<string, string>;
  /** resource attributes of the request's first resource */
  resource: Record<string, string | number | boolean>;
  spans: number;
}

export interface OtlpReceiver {
  /** base endpoint for OTEL_EXPORTER_OTLP_ENDPOINT (HTTP: JSON or protobuf) */
  url: string;
  /** the gRPC endpoint (`http://host:port`) for OTEL_EXPORTER_OTLP_PROTOCOL=grpc */
  grpcUrl: string;
  spans: ReceivedSpan[];
  requests: ReceivedRequest[];
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
  const requests: ReceivedRequest[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      if (req.method !== "POST" || req.url !== "/v1/traces") {
        res.writeHead(404).end();
        return;
      }
      const contentType = String(req.headers["content-type"] ?? "");
      const json = contentType.startsWith("application/json");
      if (!json && !contentType.startsWith("application/x-protobuf")) {
        res
          .writeHead(415, { "content-type": "text/plain" })
          .end("OTLP/HTTP takes application/json or application/x-protobuf\n");
        return;
      }
      try {
        let body = Buffer.concat(chunks);
        if (req.headers["content-encoding"] === "gzip") body = gunzipSync(body);
        const got = json ? fromJson(body) : decodeTraceRequest(body);
        spans.push(...got.spans);
        requests.push({
          protocol: json ? "http/json" : "http/protobuf",
          contentType,
          headers: Object.fromEntries(Object.entries(req.headers).map(([k, v]) => [k, String(v)])),
          resource: got.resource,
          spans: got.spans.length,
        });
        if (json) res.writeHead(200, { "content-type": "application/json" }).end("{}");
        else res.writeHead(200, { "content-type": "application/x-protobuf" }).end(Buffer.alloc(0));
        return;
      } catch (err) {
        res.writeHead(400, { "content-type": "text/plain" }).end(String((err as Error).message));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  const addr = server.address();
  const port = typeof addr === "object" && addr ? addr.port : 0;

  // OTLP/gRPC: the TraceService's Export method, its request decoded like the protobuf body above
  const grpcServer = new grpc.Server();
  grpcServer.addService(
    {
      Export: {
        path: "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        requestStream: false,
        responseStream: false,
        requestSerialize: (b: Buffer) => b,
        requestDeserialize: (b: Buffer) => b,
        responseSerialize: () => Buffer.alloc(0),
        responseDeserialize: (b: Buffer) => b,
      },
    },
    {
      Export: (call: grpc.ServerUnaryCall<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>) => {
        try {
          const got = decodeTraceRequest(call.request);
          spans.push(...got.spans);
          const md = call.metadata.getMap();
          requests.push({
            protocol: "grpc",
            contentType: "application/grpc",
            headers: Object.fromEntries(Object.entries(md).map(([k, v]) => [k, String(v)])),
            resource: got.resource,
            spans: got.spans.length,
          });
          callback(null, Buffer.alloc(0));
        } catch (err) {
          callback({ code: grpc.status.INVALID_ARGUMENT, details: (err as Error).message });
        }
      },
    },
  );
  const grpcPort = await new Promise<number>((resolve, reject) =>
    grpcServer.bindAsync(`${host}:0`, grpc.ServerCredentials.createInsecure(), (err, p) =>
      err ? reject(err) : resolve(p),
    ),
  );
  return {
    url: `http://${host}:${port}`,
    grpcUrl: `http://${host}:${grpcPort}`,
    requests,
    spans,
    waitForSpans: (predicate, timeoutMs = 15_000) =>
      waitFor(() => (predicate(spans) ? spans : false), {
        timeoutMs,
        intervalMs: 100,
        message: "expected spans did not arrive",
      }),
    stop: async () => {
      grpcServer.forceShutdown();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };
}

type Decoded = { spans: ReceivedSpan[]; resource: Record<string, string | number | boolean> };

function fromJson(body: Buffer): Decoded {
  const data = JSON.parse(body.toString("utf8")) as {
    resourceSpans?: {
      resource?: { attributes?: { key: string; value: AnyValue }[] };
      scopeSpans?: { spans?: Record<string, unknown>[] }[];
    }[];
  };
  const out: ReceivedSpan[] = [];
  let resource: Record<string, string | number | boolean> = {};
  for (const [i, rs] of (data.resourceSpans ?? []).entries()) {
    const ra = attrs(rs.resource?.attributes);
    if (i === 0) resource = ra;
    const service = String(ra["service.name"] ?? "");
    for (const ss of rs.scopeSpans ?? []) {
      for (const s of ss.spans ?? []) {
        const parent = id(s.parentSpanId);
        out.push({
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
  return { spans: out, resource };
}

// --- OTLP protobuf, read by field number (opentelemetry/proto/collector/trace/v1) -------------------

type Field = { no: number; wire: number; bytes?: Buffer; num?: bigint };

function fields(buf: Buffer): Field[] {
  const out: Field[] = [];
  let i = 0;
  const varint = (): bigint => {
    let r = 0n;
    let shift = 0n;
    for (;;) {
      if (i >= buf.length) throw new Error("truncated varint");
      const b = buf[i++]!;
      r |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) return r;
      shift += 7n;
    }
  };
  while (i < buf.length) {
    const key = Number(varint());
    const no = key >>> 3;
    const wire = key & 7;
    if (wire === 0) out.push({ no, wire, num: varint() });
    else if (wire === 1) {
      out.push({ no, wire, num: buf.readBigUInt64LE(i) });
      i += 8;
    } else if (wire === 2) {
      const len = Number(varint());
      if (i + len > buf.length) throw new Error("truncated field");
      out.push({ no, wire, bytes: buf.subarray(i, i + len) });
      i += len;
    } else if (wire === 5) {
      out.push({ no, wire, num: BigInt(buf.readUInt32LE(i)) });
      i += 4;
    } else throw new Error(`unsupported wire type ${wire}`);
  }
  return out;
}

const sub = (f: Field[], no: number) => f.filter((x) => x.no === no && x.bytes).map((x) => x.bytes!);
const str = (f: Field[], no: number) => sub(f, no)[0]?.toString("utf8") ?? "";
const hex = (f: Field[], no: number) => sub(f, no)[0]?.toString("hex") ?? "";
const num = (f: Field[], no: number) => f.find((x) => x.no === no && x.num !== undefined)?.num ?? 0n;

function anyValue(b: Buffer | undefined): string | number | boolean {
  if (!b) return "";
  const f = fields(b);
  const s = sub(f, 1)[0];
  if (s) return s.toString("utf8");
  const v = f[0];
  if (!v) return "";
  if (v.no === 2) return v.num === 1n;
  if (v.no === 3) return Number(BigInt.asIntN(64, v.num ?? 0n));
  if (v.no === 4 && v.num !== undefined) {
    const d = Buffer.alloc(8);
    d.writeBigUInt64LE(v.num);
    return d.readDoubleLE(0);
  }
  return "";
}

function keyValues(list: Buffer[]): Record<string, string | number | boolean> {
  const out: Record<string, string | number | boolean> = {};
  for (const kv of list) {
    const f = fields(kv);
    out[str(f, 1)] = anyValue(sub(f, 2)[0]);
  }
  return out;
}

/** An ExportTraceServiceRequest in protobuf, as OTLP/HTTP protobuf and OTLP/gRPC carry it. */
export function decodeTraceRequest(body: Buffer): Decoded {
  const out: ReceivedSpan[] = [];
  let resource: Record<string, string | number | boolean> = {};
  for (const [i, rsb] of sub(fields(body), 1).entries()) {
    const rs = fields(rsb);
    const resB = sub(rs, 1)[0];
    const ra = resB ? keyValues(sub(fields(resB), 1)) : {};
    if (i === 0) resource = ra;
    const service = String(ra["service.name"] ?? "");
    for (const ssb of sub(rs, 2)) {
      for (const sb of sub(fields(ssb), 2)) {
        const s = fields(sb);
        const parent = hex(s, 4);
        const status = sub(s, 15)[0];
        out.push({
          service,
          traceId: hex(s, 1),
          spanId: hex(s, 2),
          parentSpanId: parent === "" ? undefined : parent,
          name: str(s, 5),
          kind: Number(num(s, 6)),
          attributes: keyValues(sub(s, 9)),
          links: sub(s, 13).map((l) => {
            const lf = fields(l);
            return { traceId: hex(lf, 1), spanId: hex(lf, 2) };
          }),
          startNs: num(s, 7),
          status: status ? Number(num(fields(status), 3)) : 0,
        });
      }
    }
  }
  return { spans: out, resource };
}
