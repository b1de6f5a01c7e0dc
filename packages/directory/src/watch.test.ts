import { mkdir, rename, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { tempDir, waitFor } from "../test/helpers.ts";
import { generateDkimKey } from "./dev.ts";
import type { Directory } from "./directory.ts";
import { DirectoryError } from "./errors.ts";
import { type DirectoryWatcher, watchDirectory } from "./watch.ts";

const yamlWith = (...users: string[]) =>
  `domains:\n  example.test:\nusers:\n${users.map((u) => `  ${u}@example.test: {}`).join("\n")}\n`;

let dir: string;
let cleanup: () => Promise<void>;
let watcher: DirectoryWatcher | undefined;
let reloads: Directory[];
let errors: Error[];
const callbacks = {
  onReload: (d: Directory) => reloads.push(d),
  onError: (e: Error) => errors.push(e),
};

beforeEach(async () => {
  ({ dir, cleanup } = await tempDir());
  reloads = [];
  errors = [];
});
afterEach(async () => {
  watcher?.close();
  watcher = undefined;
  await cleanup();
});

describe("watchDirectory", () => {
  it("serves a rewritten file within seconds, and keeps the old directory when the new one is broken", async () => {
    const file = join(dir, "directory.yaml");
    await writeFile(file, yamlWith("alice"));
    watcher = await watchDirectory(file, callbacks);
    expect(watcher.current().users()).toEqual(["alice@example.test"]);

    await writeFile(file, yamlWith("alice", "bob"));
    await waitFor(() => watcher!.current().hasUser("bob@example.test"), 5000, "bob to appear");
    expect(reloads).toHaveLength(1);
    expect(reloads[0]).toBe(watcher.current());

    await writeFile(file, "domains: [this is: not valid\n");
    await waitFor(() => errors.length > 0, 5000, "onError");
    expect(errors[0]).toBeInstanceOf(DirectoryError);
    expect(errors[0]!.message).toContain(file);
    expect(watcher.current().users()).toEqual(["alice@example.test", "bob@example.test"]);

    // valid but wrong: a user in an unlisted domain
    await writeFile(file, `${yamlWith("alice")}  carol@elsewhere.test: {}\n`);
    await waitFor(() => errors.length > 1, 5000, "second onError");
    expect(errors[1]!.message).toContain(
      'users["carol@elsewhere.test"]: domain "elsewhere.test" is not listed',
    );
    expect(watcher.current().hasUser("bob@example.test")).toBe(true);

    // fixed again: served, and the broken versions were each reported once
    await writeFile(file, yamlWith("carol"));
    await waitFor(() => watcher!.current().hasUser("carol@example.test"), 5000, "carol to appear");
    expect(errors).toHaveLength(2);
    expect(reloads).toHaveLength(2);
  });

  it("follows a Kubernetes ConfigMap update (the ..data symlink swap)", async () => {
    // the layout kubelet writes: <mount>/..<timestamp>/file, ..data -> ..<timestamp>, file -> ..data/file
    const mount = join(dir, "mount");
    await mkdir(join(mount, "..2024_01_01_00_00_00.1"), { recursive: true });
    await writeFile(join(mount, "..2024_01_01_00_00_00.1", "directory.yaml"), yamlWith("alice"));
    await symlink("..2024_01_01_00_00_00.1", join(mount, "..data"));
    await symlink("..data/directory.yaml", join(mount, "directory.yaml"));
    // polling effectively off: the folder watch alone must notice the swap
    watcher = await watchDirectory(join(mount, "directory.yaml"), { ...callbacks, pollIntervalMs: 60_000 });
    expect(watcher.current().users()).toEqual(["alice@example.test"]);

    await mkdir(join(mount, "..2024_01_01_00_05_00.2"));
    await writeFile(join(mount, "..2024_01_01_00_05_00.2", "directory.yaml"), yamlWith("alice", "dave"));
    await symlink("..2024_01_01_00_05_00.2", join(mount, "..data_tmp"));
    await rename(join(mount, "..data_tmp"), join(mount, "..data"));

    await waitFor(() => watcher!.current().hasUser("dave@example.test"), 5000, "dave to appear");
    expect(errors).toEqual([]);
  });

  it("notices changes by polling alone, including a rotated DKIM key file", async () => {
    const file = join(dir, "directory.yaml");
    const [key1, key2] = await Promise.all([
      generateDkimKey("ed25519-sha256"),
      generateDkimKey("ed25519-sha256"),
    ]);
    await writeFile(join(dir, "dkim.pem"), key1);
    const withKey = (...users: string[]) =>
      yamlWith(...users).replace(
        "example.test:\n",
        "example.test:\n    dkim: { selector: s, privateKeyFile: dkim.pem }\n",
      );
    await writeFile(file, withKey("alice"));
    watcher = await watchDirectory(file, {
      ...callbacks,
      fsWatch: false,
      pollIntervalMs: 100,
      debounceMs: 20,
    });
    expect(watcher.current().dkim("example.test")?.privateKey).toBe(key1);

    await writeFile(file, withKey("alice", "erin"));
    await waitFor(() => watcher!.current().hasUser("erin@example.test"), 3000, "erin to appear");

    await writeFile(join(dir, "dkim.pem"), key2);
    await waitFor(() => watcher!.current().dkim("example.test")?.privateKey === key2, 3000, "the new key");
    expect(reloads).toHaveLength(2);
  });

  it("debounces a burst of writes into one reload of the final content", async () => {
    const file = join(dir, "directory.yaml");
    await writeFile(file, yamlWith("alice"));
    watcher = await watchDirectory(file, { ...callbacks, debounceMs: 300 });
    for (let i = 0; i < 10; i++) {
      await writeFile(file, yamlWith("alice", `u${i}`));
      await new Promise((r) => setTimeout(r, 10));
    }
    await waitFor(() => watcher!.current().hasUser("u9@example.test"), 5000, "the last write");
    await new Promise((r) => setTimeout(r, 500));
    expect(reloads.length).toBeLessThanOrEqual(2);
    expect(watcher.current().hasUser("u9@example.test")).toBe(true);
  });

  it("a file touched without a change does not count as a reload", async () => {
    const file = join(dir, "directory.yaml");
    await writeFile(file, yamlWith("alice"));
    watcher = await watchDirectory(file, callbacks);
    const first = watcher.current();
    await writeFile(file, yamlWith("alice"));
    await watcher.reload();
    expect(watcher.current()).toBe(first);
    expect(reloads).toEqual([]);
  });

  it("refuses to start on a file that does not load", async () => {
    const file = join(dir, "directory.yaml");
    await writeFile(file, "users:\n  alice@example.test: {}\n");
    await expect(watchDirectory(file, callbacks)).rejects.toThrow(/not listed under domains/);
    await expect(watchDirectory(join(dir, "missing.yaml"), callbacks)).rejects.toThrow(
      /cannot read the file/,
    );
  });
});
