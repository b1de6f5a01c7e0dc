// `npm run bench -- compare`: the private Postfix's config is one Postfix accepts, and a tiny run
// of each mode goes through both sides and prints the comparison (figures are not checked: a test
// asserts no timing).
import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { findBinary } from "@mailpipe/testing";
import { describe, expect, it } from "vitest";
import { renderPostfix } from "../../scripts/bench/postfix.ts";

const exec = promisify(execFile);
const root = join(import.meta.dirname, "..", "..");

describe("npm run bench -- compare", () => {
  it("renders a Postfix configuration that postfix check accepts, all under its own folder", async () => {
    const dir = await mkdtemp(join(tmpdir(), "bench-postfix-"));
    try {
      const conf = await renderPostfix({ dir, port: 2625, sinkPort: 2626 });
      await exec(findBinary("postfix")!, ["-c", conf, "check"]);
      const { stdout } = await exec(findBinary("postconf")!, ["-c", conf, "-n"]);
      for (const line of stdout.split("\n").filter((l) => /_directory = |maillog_file = /.test(l))) {
        expect(line).toContain(dir);
      }
      expect(stdout).toContain("inet_interfaces = 127.0.0.1");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it.each(["inbound", "relay"])(
    "runs %s through Postfix and the pipeline and prints both",
    async (mode) => {
      const { stdout } = await exec(
        process.execPath,
        [
          "scripts/bench/compare.ts",
          mode,
          "--messages",
          "30",
          "--sessions",
          "5",
          "--rounds",
          "1",
          "--warmup",
          "10",
        ],
        { cwd: root, timeout: 240_000 },
      );
      // Postfix's daemons are measured; which ones used a clock tick in 30 messages varies (a CI run
      // under load once had no smtpd in the list), so any of them will do
      expect(stdout).toMatch(
        /round 1 postfix .* final \d+\/s \(30\/30\); CPU ms\/msg [\d.]+ \[.*\b(smtpd|smtp|cleanup|qmgr|virtual) \d/,
      );
      const pipeline = stdout.split("\n").find((l) => l.includes("round 1 mailpipe")) ?? "";
      expect(pipeline).toMatch(/final \d+\/s \(30\/30\); CPU ms\/msg [\d.]+ \[/);
      for (const p of [
        "mx",
        "router",
        mode === "relay" ? "delivery" : "mda",
        "nats-server",
        "redis-server",
      ]) {
        expect(pipeline).toContain(`${p} `);
      }
      expect(stdout).toMatch(/latency p50 \d+ ms p95 \d+ ms p99 \d+ ms/);
      expect(stdout).toMatch(/ratio mailpipe\/Postfix: throughput [\d.]+, CPU per message [\d.]+/);
    },
    300_000,
  );
});
