// Production code never reaches test support. Test harnesses and fixtures live in each service's or
// package's test/ folder (left out of the image by deploy/Dockerfile.dockerignore); the test kit is
// the @mailpipe/testing package; smtp-edge's raw SMTP client is exported as a separate
// "@mailpipe/smtp-edge/testing" entry for other packages' tests. Production files (everything under
// services/*/src and packages/*/src except *.test.ts) import none of these, and no workspace
// package lists @mailpipe/testing as a production dependency.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = fileURLToPath(new URL("../..", import.meta.url));
const TEST_KIT = "@mailpipe/testing";

function workspaceDirs(): string[] {
  return ["packages", "services"].flatMap((top) =>
    readdirSync(join(root, top), { withFileTypes: true })
      .filter((e) => e.isDirectory() && existsSync(join(root, top, e.name, "package.json")))
      .map((e) => join(root, top, e.name)),
  );
}

function sourceFiles(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const path = join(dir, e.name);
    if (e.isDirectory()) return e.name === "node_modules" ? [] : sourceFiles(path);
    return /\.(?:ts|mts|cts|js|mjs)$/.test(e.name) ? [path] : [];
  });
}

/** Every module specifier a file imports or re-exports, statically or dynamically. */
function specifiers(source: string): string[] {
  const found: string[] = [];
  const patterns = [
    /\b(?:import|export)\s[^"';]*?\bfrom\s*["']([^"']+)["']/g, // import x from "…", export { x } from "…"
    /\bimport\s*["']([^"']+)["']/g, // import "…"
    /\bimport\s*\(\s*["']([^"']+)["']/g, // import("…")
    /\brequire\s*\(\s*["']([^"']+)["']/g, // require("…")
  ];
  for (const p of patterns) for (const m of source.matchAll(p)) found.push(m[1]!);
  return found;
}

/** Why importing `spec` from `file` reaches test support, or null. */
function testSupportReason(spec: string, file: string): string | null {
  if (spec === TEST_KIT || spec.startsWith(`${TEST_KIT}/`)) return "the test kit";
  if (/^@mailpipe\/[^/]+\/testing(?:\/|$)/.test(spec)) return "a /testing export";
  if (spec.startsWith(".")) {
    const target = resolve(dirname(file), spec);
    const inWorkspace = relative(root, target).split(sep);
    // services/<name>/test/…, packages/<name>/test/…, or the test kit's own sources
    if (inWorkspace[2] === "test") return `a test/ folder (${inWorkspace.join("/")})`;
    if (inWorkspace[0] === "packages" && inWorkspace[1] === "testing") return "the test kit's sources";
    if (/\.(?:test|fixture)\.ts$/.test(target)) return "a test file";
  }
  return null;
}

describe("test support stays out of production code", () => {
  it("recognises each way of reaching test support (so the scan below can fail)", () => {
    const pkg = join(root, "services", "mx");
    const file = join(pkg, "src", "mx.ts");
    const reaches = (line: string) => specifiers(line).map((spec) => testSupportReason(spec, file));
    for (const line of [
      'import { startNats } from "@mailpipe/testing";',
      'import type { RawSmtp } from "@mailpipe/smtp-edge/testing";',
      'export { startEnvironment } from "../test/harness.ts";',
      'const m = await import("../../../packages/testing/src/servers.ts");',
      'import "./helpers.fixture.ts";',
    ]) {
      expect(reaches(line), line).toHaveLength(1);
      expect(reaches(line)[0], line).not.toBeNull();
    }
    for (const line of [
      'import { mxConfig } from "./config.ts";',
      'import { createSmtpEdge } from "@mailpipe/smtp-edge";',
    ])
      expect(reaches(line), line).toEqual([null]);
  });

  it("no file under services/*/src or packages/*/src (other than *.test.ts) imports test support", () => {
    const offences: string[] = [];
    let scanned = 0;
    for (const pkg of workspaceDirs()) {
      // the test kit is itself test support: nothing in production may import it (checked here)
      if (relative(root, pkg) === join("packages", "testing")) continue;
      for (const file of sourceFiles(join(pkg, "src"))) {
        if (file.endsWith(".test.ts")) continue;
        scanned++;
        for (const spec of specifiers(readFileSync(file, "utf8"))) {
          const reason = testSupportReason(spec, file);
          if (reason) offences.push(`${relative(root, file)} imports "${spec}" (${reason})`);
        }
      }
    }
    expect(scanned).toBeGreaterThan(50);
    expect(offences).toEqual([]);
  });

  it("no workspace package depends on the test kit outside devDependencies", () => {
    const offences: string[] = [];
    for (const pkg of workspaceDirs()) {
      const manifest = JSON.parse(readFileSync(join(pkg, "package.json"), "utf8")) as {
        dependencies?: Record<string, string>;
        peerDependencies?: Record<string, string>;
        optionalDependencies?: Record<string, string>;
      };
      for (const field of ["dependencies", "peerDependencies", "optionalDependencies"] as const) {
        if (manifest[field]?.[TEST_KIT]) offences.push(`${relative(root, pkg)}: ${field}`);
      }
    }
    expect(offences).toEqual([]);
  });

  it("test support lives in test/ folders, not in src/", () => {
    const misplaced = workspaceDirs()
      .filter((pkg) => relative(root, pkg) !== join("packages", "testing"))
      .flatMap((pkg) => sourceFiles(join(pkg, "src")))
      .map((f) => relative(root, f))
      .filter((f) =>
        /(?:\.fixture\.ts|test-(?:harness|helpers)\.ts|\/testing\.ts|\/fixtures\/|\/bench\/)/.test(f),
      );
    expect(misplaced).toEqual([]);
  });
});
