// The README documents every configuration variable every service reads, and every mailctl command.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { USAGE } from "@mailpipe/mailctl";
import { describe, expect, it } from "vitest";
import { config as delivery } from "../../services/delivery/src/config.ts";
import { config as mda } from "../../services/mda/src/config.ts";
import { msaConfig as msa } from "../../services/msa/src/config.ts";
import { mxConfig as mx } from "../../services/mx/src/config.ts";
import { config as router } from "../../services/router/src/config.ts";

const readme = readFileSync(fileURLToPath(new URL("../../README.md", import.meta.url)), "utf8");

describe("README", () => {
  it.each([
    ["mx", mx],
    ["msa", msa],
    ["router", router],
    ["delivery", delivery],
    ["mda", mda],
  ])("documents every variable %s reads", (_name, schema) => {
    const keys = Object.keys((schema as unknown as { shape: Record<string, unknown> }).shape);
    expect(keys.length).toBeGreaterThan(10);
    const missing = keys.filter((k) => !readme.includes(`\`${k}\``));
    expect(missing).toEqual([]);
  });

  it("documents every mailctl command and the two commands", () => {
    const commands = [...USAGE.matchAll(/^ {2}mailctl (\w+(?: \w+)?)/gm)].map((m) => `mailctl ${m[1]}`);
    expect(commands.length).toBeGreaterThan(5);
    for (const c of commands) expect(readme, c).toContain(c);
    expect(readme).toContain("npm start");
    expect(readme).toContain("npm test");
  });
});
