import { chmod, readdir, readFile, stat, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { tempDir, testHash } from "../test/helpers.ts";
import { generateDkimKey } from "./dev.ts";
import { Directory } from "./directory.ts";
import { addDomain, removeUser, setDkim, setUser } from "./edit.ts";
import { DirectoryError } from "./errors.ts";

const original = `# Directory for the test site
# (comments must survive edits)
domains:
  example.test: # our main domain
    quota: 1G
  example.org:
users:
  # the boss
  Alice@example.test:
    quota: 500M # generous
  bob@example.test: {}
aliases:
  team@example.test: [alice@example.test, bob@example.test] # everyone
`;

let dir: string;
let cleanup: () => Promise<void>;
let file: string;

beforeEach(async () => {
  ({ dir, cleanup } = await tempDir());
  file = join(dir, "directory.yaml");
  await writeFile(file, original);
  await chmod(file, 0o640);
});
afterEach(() => cleanup());

const comments = [
  "# Directory for the test site",
  "# (comments must survive edits)",
  "example.test: # our main domain",
  "# the boss",
  "quota: 500M # generous",
  "[alice@example.test, bob@example.test] # everyone",
];

async function expectCommentsKept(): Promise<string> {
  const text = await readFile(file, "utf8");
  for (const c of comments) expect(text).toContain(c);
  return text;
}

describe("setUser", () => {
  it("creates a user with a password that then loads and logs in, keeping comments and layout", async () => {
    const hash = await testHash("pw-carol");
    expect(await setUser(file, "Carol@Example.test", { passwordHash: hash, quota: "2G" })).toBe("created");
    // byte for byte the original, plus the new user's lines
    expect(await readFile(file, "utf8")).toBe(
      original.replace(
        "  bob@example.test: {}\n",
        `  bob@example.test: {}\n  carol@example.test:\n    password: "${hash}"\n    quota: 2G\n`,
      ),
    );
    const d = await Directory.load(file);
    expect(d.user("carol@example.test")?.quota).toBe(2 * 1024 ** 3);
    expect(await d.verifyPassword("carol@example.test", "pw-carol")).toBe(true);
    expect(d.users()).toEqual(["alice@example.test", "bob@example.test", "carol@example.test"]);
  });

  it("updates an existing user found case-insensitively, only touching the given fields", async () => {
    const hash = await testHash("new-pw");
    expect(await setUser(file, "alice@EXAMPLE.test", { passwordHash: hash })).toBe("updated");
    await expectCommentsKept();
    let d = await Directory.load(file);
    expect(await d.verifyPassword("alice@example.test", "new-pw")).toBe(true);
    expect(d.quota("alice@example.test")).toBe(500 * 1024 ** 2);

    await setUser(file, "alice@example.test", { quota: null });
    d = await Directory.load(file);
    expect(d.quota("alice@example.test")).toBe(1024 ** 3); // back to the domain default
    expect(await readFile(file, "utf8")).not.toContain("# generous");
  });

  it("fills in a user written with no settings", async () => {
    await setUser(file, "bob@example.test", { quota: 1000 });
    expect((await Directory.load(file)).quota("bob@example.test")).toBe(1000);
  });

  it("refuses a domain that is not listed, a plain-text password and a bad quota, leaving the file alone", async () => {
    await expect(setUser(file, "dave@elsewhere.test", {})).rejects.toThrow(
      'domain "elsewhere.test" is not listed under domains',
    );
    await expect(setUser(file, "dave@example.test", { passwordHash: "plain-text" })).rejects.toThrow(
      /users\["dave@example.test"\]\.password: must be a salted scrypt hash/,
    );
    await expect(setUser(file, "dave@example.test", { quota: "lots" })).rejects.toBeInstanceOf(
      DirectoryError,
    );
    await expect(setUser(file, "not-an-address", {})).rejects.toThrow(/not a valid address/);
    expect(await readFile(file, "utf8")).toBe(original);
  });
});

describe("removeUser", () => {
  it("removes a user and reports whether there was one", async () => {
    expect(await removeUser(file, "BOB@example.test")).toBe(true);
    await expectCommentsKept();
    const d = await Directory.load(file);
    expect(d.hasUser("bob@example.test")).toBe(false);
    expect(d.hasUser("alice@example.test")).toBe(true);
    // the alias still names bob, who is now unknown
    expect(d.resolve("team@example.test").unknown).toEqual(["bob@example.test"]);
    expect(await removeUser(file, "bob@example.test")).toBe(false);
  });
});

describe("setDkim", () => {
  it("adds a DKIM key file to a domain without settings, then replaces it", async () => {
    const pem = await generateDkimKey("ed25519-sha256");
    await writeFile(join(dir, "org.pem"), pem);
    await setDkim(file, "Example.ORG", {
      selector: "s1",
      algorithm: "ed25519-sha256",
      privateKeyFile: "org.pem",
    });
    await expectCommentsKept();
    let d = await Directory.load(file);
    expect(d.dkim("example.org")).toEqual({ selector: "s1", algorithm: "ed25519-sha256", privateKey: pem });

    const rsa = await generateDkimKey("rsa-sha256");
    await writeFile(join(dir, "org2.pem"), rsa);
    await setDkim(file, "example.org", {
      selector: "s2",
      algorithm: "rsa-sha256",
      privateKeyFile: "org2.pem",
    });
    d = await Directory.load(file);
    expect(d.dkim("example.org")).toEqual({ selector: "s2", algorithm: "rsa-sha256", privateKey: rsa });
    expect((await readFile(file, "utf8")).match(/dkim:/g)).toHaveLength(1);
  });

  it("refuses a missing key file or an unlisted domain, leaving the file alone", async () => {
    await expect(
      setDkim(file, "example.test", {
        selector: "mail",
        algorithm: "rsa-sha256",
        privateKeyFile: "nope.pem",
      }),
    ).rejects.toThrow(/dkim\.privateKeyFile: cannot read .*nope\.pem \(ENOENT\)/);
    await expect(
      setDkim(file, "elsewhere.test", { selector: "mail", algorithm: "rsa-sha256", privateKeyFile: "x.pem" }),
    ).rejects.toThrow(/not listed under domains/);
    expect(await readFile(file, "utf8")).toBe(original);
  });
});

describe("addDomain", () => {
  it("adds a domain once, after which users can be created in it", async () => {
    expect(await addDomain(file, "New.Example")).toBe(true);
    expect(await addDomain(file, "new.example")).toBe(false);
    await expectCommentsKept();
    await setUser(file, "zoe@new.example", { passwordHash: await testHash("z") });
    const d = await Directory.load(file);
    expect(d.domains()).toEqual(["example.org", "example.test", "new.example"]);
    expect(d.acceptsRecipient("zoe@new.example")).toBe("ok");
  });

  it("creates the file when there is none", async () => {
    const fresh = join(dir, "fresh.yaml");
    expect(await addDomain(fresh, "example.test")).toBe(true);
    expect((await Directory.load(fresh)).domains()).toEqual(["example.test"]);
    expect((await stat(fresh)).mode & 0o777).toBe(0o600);
  });
});

describe("writing", () => {
  it("replaces the file atomically: same mode, no temp files left, symlinks written through", async () => {
    await setUser(file, "x@example.test", {});
    expect((await stat(file)).mode & 0o777).toBe(0o640);
    expect((await readdir(dir)).sort()).toEqual(["directory.yaml"]);

    const link = join(dir, "link.yaml");
    await symlink(file, link);
    await setUser(link, "y@example.test", {});
    expect((await Directory.load(file)).hasUser("y@example.test")).toBe(true);
    expect((await stat(link)).isFile()).toBe(true);
    expect((await readdir(dir)).sort()).toEqual(["directory.yaml", "link.yaml"]);
  });

  it("concurrent edits of one file are all kept", async () => {
    await Promise.all(
      Array.from({ length: 8 }, (_, i) => setUser(file, `u${i}@example.test`, { quota: i + 1 })),
    );
    const d = await Directory.load(file);
    for (let i = 0; i < 8; i++) expect(d.quota(`u${i}@example.test`)).toBe(i + 1);
  });
});
