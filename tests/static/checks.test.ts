// Lint and type check run as part of the test suite, so `npm test` and CI count them.
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = fileURLToPath(new URL("../..", import.meta.url));

function run(cmd: string, args: string[]) {
  const r = spawnSync(cmd, args, { cwd: root, encoding: "utf8", timeout: 300_000 });
  return { status: r.status, output: `${r.stdout}\n${r.stderr}`.trim() };
}

describe("static checks", () => {
  it("biome finds no lint or format problems", () => {
    const r = run("node_modules/.bin/biome", ["ci", "--colors=off", "."]);
    expect(r.status, r.output).toBe(0);
  });

  it("tsc finds no type errors", () => {
    const r = run("node_modules/.bin/tsc", ["--noEmit", "-p", "tsconfig.json"]);
    expect(r.status, r.output).toBe(0);
  }, 300_000);
});
