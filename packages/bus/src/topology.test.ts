// Management steps asked again while a clustered JetStream has no leader for a moment; anything else
// fails at once. (bus.cluster.test.ts raises replicas on a real 3-node cluster, where this happens.)
import { JetStreamApiError } from "@nats-io/jetstream";
import { describe, expect, it } from "vitest";
import { BusError } from "./errors.ts";
import { isTransient, whileUnavailable } from "./topology.ts";

const unavailable = () =>
  new JetStreamApiError({
    code: 503,
    err_code: 10008,
    description: "JetStream system temporarily unavailable",
  });
const notFound = () => new JetStreamApiError({ code: 404, err_code: 10059, description: "stream not found" });

describe("whileUnavailable", () => {
  it("asks again while JetStream is temporarily unavailable, then returns the answer", async () => {
    let calls = 0;
    const answer = await whileUnavailable(
      async () => {
        calls++;
        if (calls < 3) throw unavailable();
        return "ok";
      },
      { firstPauseMs: 1 },
    );
    expect(answer).toBe("ok");
    expect(calls).toBe(3);
  });

  it("throws any other error at once", async () => {
    let calls = 0;
    const step = async () => {
      calls++;
      throw notFound();
    };
    await expect(whileUnavailable(step, { firstPauseMs: 1 })).rejects.toThrow("stream not found");
    expect(calls).toBe(1);
  });

  it("gives up with the last error once its time is spent", async () => {
    let calls = 0;
    const step = async () => {
      calls++;
      throw unavailable();
    };
    await expect(whileUnavailable(step, { forMs: 50, firstPauseMs: 5 })).rejects.toThrow(
      "temporarily unavailable",
    );
    expect(calls).toBeGreaterThan(1);
  });

  it("sees through the BusError a failed create or update is wrapped in", () => {
    expect(isTransient(new BusError("updating stream X failed", { cause: unavailable() }))).toBe(true);
    expect(isTransient(new BusError("creating stream X failed", { cause: notFound() }))).toBe(false);
    expect(isTransient(new Error("connection refused"))).toBe(false);
  });
});
