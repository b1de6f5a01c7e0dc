import { redactUrls } from "@mailpipe/telemetry";

/** A failure talking to NATS, with what to check in the message. */
export class BusError extends Error {
  override name = "BusError";
}

export class BusConnectError extends BusError {
  override name = "BusConnectError";
}

/** A stored body whose bytes do not match its reference (size or sha256). */
export class BodyIntegrityError extends BusError {
  override name = "BodyIntegrityError";
}

export class BodyNotFoundError extends BusError {
  override name = "BodyNotFoundError";
}

export function describeConnectError(servers: string, err: unknown): string {
  const e = err as { code?: string; message?: string; cause?: { code?: string; message?: string } };
  const code = e?.cause?.code ?? e?.code ?? "";
  const reason =
    code === "ECONNREFUSED"
      ? "connection refused"
      : code === "ENOTFOUND"
        ? "host not found"
        : (e?.cause?.message ?? e?.message ?? String(err));
  return `cannot reach NATS at ${redactUrls(servers)} (${reason}): is nats-server running with JetStream (-js), and is NATS_URL right?`;
}
