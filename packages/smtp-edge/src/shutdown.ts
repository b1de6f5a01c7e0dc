// Shutdown stage: two-phase and bounded. Idle sessions get 421 at once; transactions still sending
// get until a cutoff; messages fully received are stored and answered until the deadline.
import { replies } from "@mailpipe/contracts";
import type { SMTPConnection } from "smtp-server/lib/smtp-connection.js";
import { type EdgeContext, sendReply } from "./edge-context.ts";

/** Stops listening and ends every session within `timeoutMs` (see SmtpEdge.close). */
export async function shutdown(edge: EdgeContext, timeoutMs: number): Promise<void> {
  const { server, sessions, log } = edge;
  edge.draining = true;
  const closed = new Promise<void>((resolve) => server.server.close(() => resolve()));
  // sockets still in the PROXY header or TLS handshake have no session to finish
  for (const s of server._pendingSockets.values()) s.destroy();
  // the last part of the time is kept for messages already received and being stored (each
  // bounded by acceptTimeoutMs itself), so that they end with 250 rather than a 421 that
  // the client would retry; transactions still sending are cut off before it
  const deadline = Date.now() + timeoutMs;
  const cutoff = deadline - Math.min(edge.acceptTimeoutMs, timeoutMs / 2);
  const idle = (c: SMTPConnection) => !c.session.envelope?.mailFrom && !c._dataStream && !c._handlerPending;
  const finishing = (c: SMTPConnection) => {
    const t = sessions.get(c.session)?.tx;
    return !!t && t.finishing && !t.ended;
  };
  let warned = false;
  while (server.connections.size > 0 && Date.now() < deadline) {
    const late = Date.now() >= cutoff;
    if (late && !warned && [...server.connections].some((c) => !idle(c) && !finishing(c))) {
      warned = true;
      log.warn(
        { open: server.connections.size },
        "transactions still being sent at the shutdown cutoff; closing them with 421",
      );
    }
    for (const c of server.connections)
      if (!c._closing && (idle(c) || (late && !finishing(c)))) sendReply(c, replies.shuttingDown());
    await new Promise((r) => setTimeout(r, 50));
  }
  if (server.connections.size > 0) {
    log.warn(
      { open: server.connections.size },
      "messages still being stored at the shutdown deadline; closing them with 421 (not queued)",
    );
    for (const c of server.connections) edge.closeWith(c, replies.shuttingDown());
  }
  // clients get a moment to read the 421 and close; then the sockets go
  await Promise.race([closed, new Promise((r) => setTimeout(r, 1000))]);
  for (const c of server.connections) c._socket.destroy();
  await Promise.race([closed, new Promise((r) => setTimeout(r, 1000))]);
}
