import { createServer, type Server } from "node:http";
import type { Metrics } from "@mailpipe/telemetry";

export interface HealthServer {
  server: Server;
  port: number;
  close(): Promise<void>;
}

/** `/healthz` (the process is alive), `/readyz` (ready for work), `/metrics` (Prometheus). */
export async function startHealthServer(
  host: string,
  port: number,
  readiness: () => { ready: boolean; checks: Record<string, boolean> },
  metrics: Metrics,
  extraRoutes: Map<string, () => Promise<{ status: number; type: string; body: string }>> = new Map(),
): Promise<HealthServer> {
  const server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { allow: "GET, HEAD" }).end();
      return;
    }
    if (path === "/healthz") {
      res.writeHead(200, { "content-type": "text/plain" }).end("ok\n");
    } else if (path === "/readyz") {
      const r = readiness();
      res
        .writeHead(r.ready ? 200 : 503, { "content-type": "application/json" })
        .end(`${JSON.stringify({ ready: r.ready, checks: r.checks })}\n`);
    } else if (path === "/metrics") {
      metrics
        .text()
        .then((text) => res.writeHead(200, { "content-type": metrics.contentType }).end(text))
        .catch(() => res.writeHead(500).end());
    } else if (path && extraRoutes.has(path)) {
      extraRoutes.get(path)!()
        .then((r) => res.writeHead(r.status, { "content-type": r.type }).end(r.body))
        .catch(() => res.writeHead(500).end());
    } else {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
    }
  });
  server.keepAliveTimeout = 5000;
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const addr = server.address();
  return {
    server,
    port: typeof addr === "object" && addr ? addr.port : port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
