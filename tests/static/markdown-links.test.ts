// Every relative link in every Markdown file of the repository leads to a file in it (and, with
// `#anchor`, to a heading that file has): a reader who clones the repository has everything the
// documents point at, and nothing points outside (no `../shared/...`).
import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = fileURLToPath(new URL("../..", import.meta.url));
const SKIP_DIRS = new Set(["node_modules", ".git", ".data", ".turbo", "dist"]);

/** The repository's Markdown files: git's view (tracked and new, not ignored), else a walk. */
function markdownFiles(): string[] {
  try {
    const out = execFileSync("git", ["ls-files", "-co", "--exclude-standard", "*.md"], {
      cwd: root,
      encoding: "utf8",
    });
    return out
      .split("\n")
      .filter((f) => f !== "" && existsSync(join(root, f)))
      .filter((f) => !f.split("/").some((part) => SKIP_DIRS.has(part)));
  } catch {
    const found: string[] = [];
    const walk = (dir: string) => {
      for (const e of readdirSync(dir, { withFileTypes: true })) {
        if (e.isDirectory()) {
          if (!SKIP_DIRS.has(e.name)) walk(join(dir, e.name));
        } else if (e.name.endsWith(".md")) found.push(relative(root, join(dir, e.name)));
      }
    };
    walk(root);
    return found;
  }
}

/** The text outside fenced code blocks. */
const withoutFences = (text: string): string => text.replace(/^(```|~~~)[^\n]*\n[\s\S]*?^\1[^\n]*$/gm, "");

/** The text outside fenced code blocks and inline code spans, where links are links. */
const prose = (text: string): string =>
  withoutFences(text).replace(/(`+)[^`\n][\s\S]*?\1/g, (m) => " ".repeat(m.length));

/** Link targets: inline links and images, and reference definitions. */
function linkTargets(markdown: string): string[] {
  const text = prose(markdown);
  const targets: string[] = [];
  const title = `(?:\\s+(?:"[^"]*"|'[^']*'|\\([^)]*\\)))?`;
  const inline = new RegExp(`!?\\[[^\\]\\n]*\\]\\(\\s*<?([^)\\s>]+)>?${title}\\s*\\)`, "g");
  const definition = new RegExp(`^ {0,3}\\[[^\\]\\n]+\\]:\\s*<?(\\S+?)>?${title}\\s*$`, "gm");
  for (const m of text.matchAll(inline)) targets.push(m[1]!);
  for (const m of text.matchAll(definition)) targets.push(m[1]!);
  return targets;
}

/** GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens; repeats get -1, -2. */
function headingAnchors(markdown: string): Set<string> {
  const anchors = new Set<string>();
  const seen = new Map<string, number>();
  for (const m of withoutFences(markdown).matchAll(/^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$/gm)) {
    const text = m[1]!
      .replace(/\[([^\]]*)\]\([^)]*\)/g, "$1") // a link's text
      .replace(/<[^>]+>/g, "");
    const slug = text
      .toLowerCase()
      .replace(/[^\p{L}\p{N}\p{M}\s_-]/gu, "")
      .replace(/\s/g, "-");
    const n = seen.get(slug) ?? 0;
    seen.set(slug, n + 1);
    anchors.add(n === 0 ? slug : `${slug}-${n}`);
  }
  return anchors;
}

function problemsOf(file: string): string[] {
  const text = readFileSync(join(root, file), "utf8");
  const problems: string[] = [];
  for (const target of linkTargets(text)) {
    if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue; // https:, mailto:: not a file of ours
    const [pathPart = "", anchor] = target.split("#", 2);
    let path: string;
    try {
      path = decodeURIComponent(pathPart);
    } catch {
      problems.push(`${file}: ${target}: not a valid link`);
      continue;
    }
    const resolved = path === "" ? join(root, file) : resolve(root, dirname(file), path);
    const inside = relative(root, resolved);
    if (inside.startsWith("..") || inside.startsWith(sep) || resolve(root, inside) !== resolved) {
      problems.push(`${file}: ${target}: leaves the repository`);
      continue;
    }
    if (!existsSync(resolved)) {
      problems.push(`${file}: ${target}: no such file (${inside})`);
      continue;
    }
    if (anchor && statSync(resolved).isFile() && resolved.endsWith(".md")) {
      const anchors = headingAnchors(readFileSync(resolved, "utf8"));
      if (!anchors.has(anchor.toLowerCase()))
        problems.push(`${file}: ${target}: ${inside} has no heading #${anchor}`);
    }
  }
  return problems;
}

describe("Markdown links", () => {
  it("finds the repository's documents and their links", () => {
    const files = markdownFiles();
    expect(files).toContain("README.md");
    expect(files).toContain("docs/architecture.md");
    expect(linkTargets(readFileSync(join(root, "README.md"), "utf8"))).toContain("docs/architecture.md");
  });

  it("every relative link leads to a file in the repository, and every #anchor to a heading", () => {
    const problems = markdownFiles().flatMap(problemsOf);
    expect(problems).toEqual([]);
  });

  it("reads links and anchors as GitHub renders them", () => {
    const md = [
      "# The `spool`: one write",
      "## Durability rules",
      "## Durability rules",
      "See [a](docs/x.md#y), ![i](img.png 'title'), `[not](a-link.md)`, [b](https://example.com).",
      "```",
      "[not a link](in-code.md)",
      "```",
      "[ref]: ../outside.md",
    ].join("\n");
    expect(linkTargets(md)).toEqual(["docs/x.md#y", "img.png", "https://example.com", "../outside.md"]);
    expect([...headingAnchors(md)]).toEqual([
      "the-spool-one-write",
      "durability-rules",
      "durability-rules-1",
    ]);
  });
});
