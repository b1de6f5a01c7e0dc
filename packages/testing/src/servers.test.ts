import { existsSync } from "node:fs";
import net from "node:net";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { Redis } from "ioredis";
import { describe, expect, it } from "vitest";
import { tempDir } from "./process.ts";
import { chooseServerMode, detectContainerRuntime, findBinary, startNats, startRedis } from "./servers.ts";

function alive(pid: number | undefined): boolean {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The INFO line a NATS server greets every client with. */
function natsInfo(port: number): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: "127.0.0.1", port });
    let data = "";
    socket.setTimeout(2_000, () => reject(new Error("no INFO")));
    socket.on("error", reject);
    socket.on("data", (chunk) => {
      data += chunk.toString();
      const end = data.indexOf("\r\n");
      if (end < 0) return;
      socket.destroy();
      resolve(JSON.parse(data.slice("INFO ".length, end)));
    });
  });
}

describe("startNats", () => {
  it("runs JetStream on a loopback port with an 8 MiB max_payload", async () => {
    const nats = await startNats({ monitor: true });
    try {
      expect(nats.url).toBe(`nats://127.0.0.1:${nats.port}`);
      expect(alive(nats.pid)).toBe(true);
      const info = await natsInfo(nats.port);
      expect(info["jetstream"]).toBe(true);
      expect(info["max_payload"]).toBe(8 * 1024 * 1024);
      const varz = (await fetch(`${nats.monitorUrl}/varz`).then((r) => r.json())) as { port: number };
      expect(varz.port).toBe(nats.port);

      // a 2 MiB message goes through, which the default 1 MiB limit would refuse
      const nc = await connect({ servers: nats.url });
      try {
        const sub = nc.subscribe("big", { max: 1 });
        nc.publish("big", new Uint8Array(2 * 1024 * 1024).fill(7));
        for await (const m of sub) expect(m.data.length).toBe(2 * 1024 * 1024);
      } finally {
        await nc.close();
      }
    } finally {
      await nats.stop();
    }
  });

  it("keeps JetStream data and the port across restart() and a kill()", async () => {
    const nats = await startNats();
    const { port, dataDir } = nats;
    try {
      let nc = await connect({ servers: nats.url });
      const jsm = await jetstreamManager(nc);
      await jsm.streams.add({ name: "KEEP", subjects: ["keep.>"] });
      await jetstream(nc).publish("keep.one", "1");
      await jetstream(nc).publish("keep.two", "2");
      await nc.close();

      const firstPid = nats.pid;
      await nats.restart();
      expect(nats.pid).not.toBe(firstPid);
      expect(alive(firstPid)).toBe(false);
      expect(nats.port).toBe(port);

      await nats.kill();
      await expect(connect({ servers: nats.url, reconnect: false, timeout: 500 })).rejects.toThrow();
      await nats.restart();

      nc = await connect({ servers: nats.url });
      const info = await (await jetstreamManager(nc)).streams.info("KEEP");
      expect(info.state.messages).toBe(2);
      await nc.close();
      expect(nats.dataDir).toBe(dataDir);
    } finally {
      await nats.stop();
    }
    expect(existsSync(dataDir)).toBe(false);
  });

  it("leaves a store dir the caller gave", async () => {
    const dir = await tempDir("nats-caller");
    try {
      const nats = await startNats({ storeDir: dir.path });
      expect(nats.dataDir).toBe(dir.path);
      await nats.stop();
      expect(existsSync(`${dir.path}/jetstream`)).toBe(true);
    } finally {
      await dir.remove();
    }
  });
});

describe("startRedis", () => {
  it("answers on a loopback port and stops cleanly", async () => {
    const redis = await startRedis();
    const client = new Redis(redis.url, { maxRetriesPerRequest: 0, lazyConnect: true });
    try {
      await client.connect();
      expect(await client.ping()).toBe("PONG");
      expect(await client.config("GET", "appendonly")).toEqual(["appendonly", "yes"]);
      expect(await client.config("GET", "bind")).toEqual(["bind", "127.0.0.1"]);
    } finally {
      client.disconnect();
      await redis.stop();
    }
    expect(alive(redis.pid)).toBe(false);
    expect(existsSync(redis.dataDir)).toBe(false);
  });

  it("keeps data through a SIGKILL with appendonly, loses it without", async () => {
    for (const appendonly of [true, false]) {
      const redis = await startRedis({ appendonly });
      try {
        const before = new Redis(redis.url, { maxRetriesPerRequest: 0 });
        await before.set("job", "42");
        before.disconnect();
        await redis.kill();
        expect(alive(redis.pid)).toBe(false);
        await redis.restart();
        const after = new Redis(redis.url, { maxRetriesPerRequest: 0 });
        expect(await after.get("job")).toBe(appendonly ? "42" : null);
        after.disconnect();
      } finally {
        await redis.stop();
      }
    }
  });

  it("fails with the server's own words when the port is taken", async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, "127.0.0.1", resolve));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      await expect(startRedis({ port })).rejects.toThrow(
        /redis-server on 127\.0\.0\.1:\d+ exited[\s\S]*in use/i,
      );
    } finally {
      blocker.close();
    }
  });

  it("refuses restart() after stop()", async () => {
    const redis = await startRedis();
    await redis.stop();
    await expect(redis.restart()).rejects.toThrow(/stopped/);
  });
});

describe("chooseServerMode", () => {
  const base = { binary: "nats-server" };

  it("prefers local binaries, even when a container runtime exists", () => {
    expect(chooseServerMode({ ...base, binaryFound: true, runtimeAvailable: true })).toBe("local");
    expect(chooseServerMode({ ...base, binaryFound: true, runtimeAvailable: false, preference: "" })).toBe(
      "local",
    );
  });

  it("uses containers when the binary is missing and a runtime exists", () => {
    expect(chooseServerMode({ ...base, binaryFound: false, runtimeAvailable: true })).toBe("container");
  });

  it("uses containers when asked, if a runtime exists", () => {
    expect(
      chooseServerMode({ ...base, binaryFound: true, runtimeAvailable: true, preference: "container" }),
    ).toBe("container");
    expect(() =>
      chooseServerMode({ ...base, binaryFound: true, runtimeAvailable: false, preference: "container" }),
    ).toThrow(/no container runtime/);
  });

  it("says what to install when there is neither", () => {
    expect(() => chooseServerMode({ ...base, binaryFound: false, runtimeAvailable: false })).toThrow(
      "nats-server is not on PATH and no container runtime was found: apt-get install nats-server redis-server",
    );
    expect(() =>
      chooseServerMode({ ...base, binaryFound: false, runtimeAvailable: true, preference: "local" }),
    ).toThrow(/apt-get install nats-server redis-server/);
  });

  it("rejects an unknown MAILPIPE_TEST_SERVERS value", () => {
    expect(() =>
      chooseServerMode({ ...base, binaryFound: true, runtimeAvailable: true, preference: "docker" }),
    ).toThrow(/"local" or "container"/);
  });
});

describe("detectContainerRuntime and findBinary", () => {
  it("answers within its bound instead of hanging", async () => {
    const started = Date.now();
    const found = await detectContainerRuntime();
    expect(typeof found).toBe("boolean");
    expect(Date.now() - started).toBeLessThan(4_000);
  });

  it("finds executables on PATH and in sbin", () => {
    expect(findBinary("sh")).toMatch(/\/sh$/);
    expect(findBinary("redis-server")).toMatch(/\/redis-server$/);
    expect(findBinary("no-such-binary-mailpipe")).toBeUndefined();
  });
});
