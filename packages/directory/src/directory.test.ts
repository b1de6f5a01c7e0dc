import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tempDir, testHash } from "../test/helpers.ts";
import { developmentDirectory, generateDkimKey } from "./dev.ts";
import { Directory, MAX_ALIAS_DEPTH } from "./directory.ts";
import { DirectoryError } from "./errors.ts";

function errorOf(fn: () => unknown): DirectoryError {
  try {
    fn();
  } catch (err) {
    if (err instanceof DirectoryError) return err;
    throw err;
  }
  throw new Error("expected a DirectoryError, nothing was thrown");
}

function parse(yaml: string, baseDir = "/nonexistent"): Directory {
  return Directory.fromYaml(yaml, baseDir, { file: "dir.yaml" });
}

const base = `
domains:
  example.test:
  other.test:
`;

describe("loading and validation", () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let rsaPem: string;
  let edPem: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir());
    [rsaPem, edPem] = await Promise.all([generateDkimKey("rsa-sha256"), generateDkimKey("ed25519-sha256")]);
    await mkdir(join(dir, "keys"));
    await writeFile(join(dir, "keys", "example.test.mail.pem"), rsaPem);
  });
  afterAll(() => cleanup());

  it("loads the documented example: domains, users, quotas, sendAs, policies and a DKIM key file", async () => {
    const hash = await testHash("secret");
    const file = join(dir, "directory.yaml");
    await writeFile(
      file,
      `# the documented example
domains:
  Example.TEST:
    dkim:
      selector: mail
      algorithm: rsa-sha256
      privateKeyFile: keys/example.test.mail.pem
    quota: 1G
    enforceDmarc: true
    spfRejectAtMailFrom: false
  example.org:
    enforceDmarc: false
    spfRejectAtMailFrom: true
    spamToJunk: false
users:
  Alice@example.test:
    password: "${hash}"
    quota: 500M
    sendAs: [Alice.Smith@Example.test, "@Example.ORG"]
  bob@example.test: {}
  carol@example.test:
    quota: unlimited
aliases:
  postmaster@example.test: [alice@example.test]
  team@example.test: [alice@example.test, bob@example.test, friend@remote.test]
`,
    );
    const d = await Directory.load(file);
    expect(d.domains()).toEqual(["example.org", "example.test"]);
    expect(d.users()).toEqual(["alice@example.test", "bob@example.test", "carol@example.test"]);
    expect(d.aliases()).toEqual(["postmaster@example.test", "team@example.test"]);
    expect(d.isLocalDomain("EXAMPLE.test.")).toBe(true);
    expect(d.isLocalDomain("remote.test")).toBe(false);
    expect(d.user("ALICE@example.test")).toEqual({
      address: "alice@example.test",
      quota: 500 * 1024 ** 2,
      sendAs: ["alice.smith@example.test", "@example.org"],
      hasPassword: true,
    });
    expect(d.hasUser("bob@EXAMPLE.TEST")).toBe(true);
    expect(d.hasUser("team@example.test")).toBe(false);
    expect(d.quota("bob@example.test")).toBe(1024 ** 3); // the domain default
    expect(d.quota("alice+lists@example.test")).toBe(500 * 1024 ** 2);
    expect(d.quota("carol@example.test")).toBeUndefined(); // "unlimited" lifts the default
    expect(d.quota("nobody@example.test")).toBeUndefined();
    expect(d.domainPolicy("example.test")).toEqual({
      enforceDmarc: true,
      spfRejectAtMailFrom: false,
      spamToJunk: true,
    });
    expect(d.domainPolicy("example.org")).toEqual({
      enforceDmarc: false,
      spfRejectAtMailFrom: true,
      spamToJunk: false,
    });
    expect(d.domainPolicy("elsewhere.test")).toEqual({
      enforceDmarc: true,
      spfRejectAtMailFrom: false,
      spamToJunk: true,
    });
    expect(d.dkim("example.test")).toEqual({ selector: "mail", algorithm: "rsa-sha256", privateKey: rsaPem });
    expect(d.dkim("example.org")).toBeUndefined();
    expect(d.files).toEqual([file, join(dir, "keys", "example.test.mail.pem")]);
  });

  it("takes an inline key and infers the algorithm from it", () => {
    const indented = edPem.trim().split("\n").join("\n        ");
    const d = parse(`
domains:
  example.test:
    dkim:
      selector: ed1
      privateKey: |
        ${indented}
`);
    expect(d.dkim("example.test")?.algorithm).toBe("ed25519-sha256");
    expect(d.dkim("example.test")?.privateKey.trim()).toBe(edPem.trim());
  });

  it("refuses unknown keys, naming the path, the line and the keys allowed there", () => {
    const err = errorOf(() =>
      parse(`domains:
  example.test:
    dkim:
      selector: mail
      privateKey: x
      algo: rsa-sha256
users:
  alice@example.test:
    pasword: x
`),
    );
    expect(err.message).toContain(
      'dir.yaml:6:7: domains["example.test"].dkim.algo: unknown key (expected one of: selector, algorithm, privateKeyFile, privateKey)',
    );
    expect(err.message).toContain('dir.yaml:9:5: users["alice@example.test"].pasword: unknown key');
    expect(err.issues).toHaveLength(2);
  });

  it("refuses a user or alias whose domain is not listed", () => {
    const err = errorOf(() =>
      parse(`${base}users:\n  alice@elsewhere.test: {}\naliases:\n  x@nowhere.test: a@b.test\n`),
    );
    expect(err.issues.map((i) => `${i.path}: ${i.message}`)).toEqual([
      'users["alice@elsewhere.test"]: domain "elsewhere.test" is not listed under domains',
      'aliases["x@nowhere.test"]: domain "nowhere.test" is not listed under domains',
    ]);
  });

  it("refuses plain-text passwords without repeating them", () => {
    const err = errorOf(() => parse(`${base}users:\n  alice@example.test:\n    password: hunter2-secret\n`));
    expect(err.message).toContain('users["alice@example.test"].password: must be a salted scrypt hash');
    expect(err.message).not.toContain("hunter2-secret");
  });

  it("refuses scrypt hashes whose cost would exhaust memory", () => {
    const huge = "$scrypt$ln=30,r=8,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA";
    const err = errorOf(() => parse(`${base}users:\n  alice@example.test:\n    password: "${huge}"\n`));
    expect(err.issues[0]?.path).toBe('users["alice@example.test"].password');
  });

  it("reports every semantic problem at once, with its path", () => {
    const err = errorOf(() =>
      parse(`
domains:
  example.test:
    quota: 12 apples
  "not a domain!": {}
  EXAMPLE.test: {}
users:
  alice@example.test:
    sendAs: [ok@example.test, "@", "not an address"]
  ALICE@Example.Test: {}
aliases:
  team@example.test: [alice@example.test, "bad address"]
`),
    );
    // the quota is a shape error and stops before the semantic pass
    expect(err.issues.map((i) => i.path)).toEqual(['domains["example.test"].quota']);

    const err2 = errorOf(() =>
      parse(`
domains:
  example.test: {}
  "not a domain!": {}
  EXAMPLE.test: {}
users:
  alice@example.test:
    sendAs: [ok@example.test, "@", "not an address"]
  ALICE@Example.Test: {}
aliases:
  team@example.test: [alice@example.test, "bad address"]
`),
    );
    expect(err2.issues.map((i) => `${i.path}: ${i.message}`)).toEqual([
      'domains["not a domain!"]: not a valid domain name',
      'domains["EXAMPLE.test"]: the same domain as "example.test" (domains compare case-insensitively)',
      'users["alice@example.test"].sendAs[1]: not a valid @domain',
      'users["alice@example.test"].sendAs[2]: not a valid address or @domain',
      'users["ALICE@Example.Test"]: the same address as "alice@example.test" (local parts compare case-insensitively)',
      'aliases["team@example.test"][1]: not a valid address (local@domain)',
    ]);
    expect(err2.issues[0]?.line).toBe(4);
  });

  it("checks DKIM settings: one key source, readable file, matching algorithm", async () => {
    const both = errorOf(() =>
      parse(`domains:\n  example.test:\n    dkim: { selector: mail, privateKey: x, privateKeyFile: y }\n`),
    );
    expect(both.message).toContain(
      'domains["example.test"].dkim: give exactly one of privateKeyFile or privateKey',
    );
    const missing = errorOf(() =>
      parse(`domains:\n  example.test:\n    dkim: { selector: mail, privateKeyFile: keys/none.pem }\n`, dir),
    );
    expect(missing.message).toContain(
      `domains["example.test"].dkim.privateKeyFile: cannot read ${join(dir, "keys", "none.pem")} (ENOENT)`,
    );
    const mismatch = errorOf(() =>
      parse(
        `domains:\n  example.test:\n    dkim: { selector: mail, algorithm: ed25519-sha256, privateKeyFile: keys/example.test.mail.pem }\n`,
        dir,
      ),
    );
    expect(mismatch.message).toContain(
      'domains["example.test"].dkim.algorithm: is ed25519-sha256 but the key is rsa (use rsa-sha256)',
    );
    const notKey = errorOf(() =>
      parse(`domains:\n  example.test:\n    dkim: { selector: mail, privateKey: "-----BEGIN nonsense" }\n`),
    );
    expect(notKey.message).toContain('domains["example.test"].dkim.privateKey: is not a PEM private key');
    const selector = errorOf(() =>
      parse(`domains:\n  example.test:\n    dkim: { selector: "bad selector", privateKey: x }\n`),
    );
    expect(selector.issues[0]?.path).toBe('domains["example.test"].dkim.selector');
  });

  it("names the line of a YAML syntax error", () => {
    const err = errorOf(() => parse("domains:\n  example.test: {\nusers: 1\n"));
    expect(err.issues[0]?.message).toMatch(/^YAML syntax: /);
    expect(err.issues[0]?.line).toBeGreaterThanOrEqual(2);
    expect(err.message).toMatch(/dir\.yaml:\d+:\d+: YAML syntax/);
  });

  it("refuses an empty file, duplicate keys and wrong types", () => {
    expect(errorOf(() => parse("")).message).toContain("the file is empty");
    expect(errorOf(() => parse("# only a comment\n")).message).toContain("the file is empty");
    expect(errorOf(() => parse(`${base}  example.test: {}\n`)).message).toContain("YAML syntax");
    const types = errorOf(() =>
      parse(`${base}users: [alice@example.test]\naliases:\n  a@example.test: []\n`),
    );
    expect(types.issues.map((i) => i.path)).toEqual(["users", 'aliases["a@example.test"]']);
  });

  it("names the file when it cannot be read", async () => {
    const missing = join(dir, "missing.yaml");
    await expect(Directory.load(missing)).rejects.toThrow(`${missing}: cannot read the file`);
  });

  it("the development directory loads and holds the promised users and aliases", async () => {
    const { dir: keyDir, cleanup: done } = await tempDir();
    try {
      const text = await developmentDirectory({ keyDir });
      expect(text.split("\n")[0]).toMatch(/^# .*DEVELOPMENT ONLY/);
      const d = Directory.fromYaml(text, keyDir);
      expect(d.users()).toEqual(["alice@example.test", "bob@example.test"]);
      expect(d.resolve("team@example.test").local.map((l) => l.mailbox)).toEqual([
        "alice@example.test",
        "bob@example.test",
      ]);
      expect(d.resolve("postmaster@example.test").local.map((l) => l.mailbox)).toEqual([
        "alice@example.test",
      ]);
      expect(d.dkim("example.test")?.selector).toBe("mail");
      expect(await d.verifyPassword("alice@example.test", "alice-dev-password")).toBe(true);
      expect(await d.verifyPassword("bob@example.test", "bob-dev-password")).toBe(true);
      expect(await d.verifyPassword("bob@example.test", "alice-dev-password")).toBe(false);
    } finally {
      await done();
    }
  });
});

describe("resolve", () => {
  const d = parse(`
domains:
  example.test:
  example.net:
users:
  alice@example.test: {}
  bob@example.test: {}
  carol@example.net: {}
  self@example.test: {}
aliases:
  postmaster@example.test: [alice@example.test]
  team@example.test: [alice@example.test, bob@example.test, friend@Remote.TEST]
  all@example.test: [team@example.test, carol@example.net, Alice@example.test, friend@remote.test]
  ops@example.test: [postmaster@example.test]
  ping@example.test: [pong@example.test]
  pong@example.test: [ping@example.test]
  mixed@example.test: [mixed@example.test, bob@example.test]
  self@example.test: [self@example.test, backup@remote.test]
  forward@example.test: [ghost@example.test, alice+lists@example.test]
  bob-fwd@example.test: bob@elsewhere.test
`);

  it("delivers a user's mail to its mailbox, case-insensitively", () => {
    expect(d.resolve("Alice@EXAMPLE.test")).toEqual({
      local: [{ mailbox: "alice@example.test", address: "alice@example.test" }],
      remote: [],
      unknown: [],
      loops: [],
      nonLocal: false,
    });
  });

  it("expands an alias to users and remote addresses", () => {
    const r = d.resolve("team@example.test");
    expect(r.local.map((l) => l.mailbox)).toEqual(["alice@example.test", "bob@example.test"]);
    expect(r.remote).toEqual(["friend@remote.test"]);
    expect(r.unknown).toEqual([]);
    expect(r.nonLocal).toBe(false);
  });

  it("expands nested aliases and delivers each mailbox and remote address once", () => {
    const r = d.resolve("all@example.test");
    expect(r.local.map((l) => l.mailbox)).toEqual([
      "alice@example.test",
      "bob@example.test",
      "carol@example.net",
    ]);
    expect(r.remote).toEqual(["friend@remote.test"]);
    expect(d.resolve("ops@example.test").local).toEqual([
      { mailbox: "alice@example.test", address: "alice@example.test" },
    ]);
  });

  it("an alias may point only outside", () => {
    expect(d.resolve("bob-fwd@example.test")).toMatchObject({ local: [], remote: ["bob@elsewhere.test"] });
  });

  it("reports aliases that only loop, and delivers what a partly looping alias reaches", () => {
    const r = d.resolve("ping@example.test");
    expect(r.local).toEqual([]);
    expect(r.loops.sort()).toEqual(["ping@example.test", "pong@example.test"]);
    const m = d.resolve("mixed@example.test");
    expect(m.local.map((l) => l.mailbox)).toEqual(["bob@example.test"]);
    expect(m.loops).toEqual([]);
  });

  it("an alias listing itself keeps a copy when it is also a user", () => {
    const r = d.resolve("self@example.test");
    expect(r.local).toEqual([{ mailbox: "self@example.test", address: "self@example.test" }]);
    expect(r.remote).toEqual(["backup@remote.test"]);
    expect(r.loops).toEqual([]);
  });

  it("cuts alias chains deeper than the limit", () => {
    const chain = (n: number) =>
      Array.from(
        { length: n },
        (_, i) => `  a${i}@example.test: [${i === n - 1 ? "alice" : `a${i + 1}`}@example.test]`,
      );
    const ok = parse(
      `domains:\n  example.test:\nusers:\n  alice@example.test:\naliases:\n${chain(MAX_ALIAS_DEPTH).join("\n")}\n`,
    );
    expect(ok.resolve("a0@example.test").local.map((l) => l.mailbox)).toEqual(["alice@example.test"]);
    const deep = parse(
      `domains:\n  example.test:\nusers:\n  alice@example.test:\naliases:\n${chain(MAX_ALIAS_DEPTH + 1).join("\n")}\n`,
    );
    const r = deep.resolve("a0@example.test");
    expect(r.local).toEqual([]);
    expect(r.loops).toContain(`a${MAX_ALIAS_DEPTH}@example.test`);
  });

  it("plus-addressing: a valid tag becomes a folder, others only reach the mailbox", () => {
    expect(d.resolve("alice+News@example.test").local).toEqual([
      { mailbox: "alice@example.test", address: "alice+news@example.test", folder: "News" },
    ]);
    expect(d.resolve("alice+a.b@example.test").local).toEqual([
      { mailbox: "alice@example.test", address: "alice+a.b@example.test" },
    ]);
    expect(d.resolve("alice+@example.test").local).toEqual([
      { mailbox: "alice@example.test", address: "alice+@example.test" },
    ]);
    expect(d.resolve(`alice+${"x".repeat(65)}@example.test`).local[0]?.folder).toBeUndefined();
    expect(d.resolve("alice-news@example.test", { plusSeparator: "-" }).local).toEqual([
      { mailbox: "alice@example.test", address: "alice-news@example.test", folder: "news" },
    ]);
    expect(d.resolve("alice-news@example.test").unknown).toEqual(["alice-news@example.test"]);
  });

  it("plus-addressing applies to aliases, and alias targets may carry tags", () => {
    const r = d.resolve("team+x@example.test");
    expect(r.local.map((l) => l.mailbox)).toEqual(["alice@example.test", "bob@example.test"]);
    expect(r.remote).toEqual(["friend@remote.test"]);
    const f = d.resolve("forward@example.test");
    expect(f.local).toEqual([
      { mailbox: "alice@example.test", address: "alice+lists@example.test", folder: "lists" },
    ]);
    expect(f.unknown).toEqual(["ghost@example.test"]);
  });

  it("reports unknown local users and non-local addresses", () => {
    expect(d.resolve("nobody@example.test")).toEqual({
      local: [],
      remote: [],
      unknown: ["nobody@example.test"],
      loops: [],
      nonLocal: false,
    });
    expect(d.resolve("someone@gmail.test")).toEqual({
      local: [],
      remote: [],
      unknown: [],
      loops: [],
      nonLocal: true,
    });
    expect(d.resolve("not an address").nonLocal).toBe(true);
  });
});

describe("acceptsRecipient", () => {
  const d = parse(
    `${base}users:\n  alice@example.test: {}\naliases:\n  team@example.test: [alice@example.test]\n`,
  );

  it("accepts users, aliases and their plus-addresses; refuses unknown users and other domains", () => {
    expect(d.acceptsRecipient("alice@example.test")).toBe("ok");
    expect(d.acceptsRecipient("ALICE@Example.Test")).toBe("ok");
    expect(d.acceptsRecipient("alice+tag@example.test")).toBe("ok");
    expect(d.acceptsRecipient("team@example.test")).toBe("ok");
    expect(d.acceptsRecipient("team+x@example.test")).toBe("ok");
    expect(d.acceptsRecipient("bob@example.test")).toBe("unknown-user");
    expect(d.acceptsRecipient("alice@other.test")).toBe("unknown-user");
    expect(d.acceptsRecipient("alice@remote.test")).toBe("not-local");
    expect(d.acceptsRecipient("a b@example.test")).toBe("unknown-user");
  });

  it("answers quickly enough for every recipient of a busy mx", () => {
    const started = performance.now();
    for (let i = 0; i < 20_000; i++) d.resolve(i % 2 ? "team+x@example.test" : "alice@example.test");
    expect(performance.now() - started).toBeLessThan(2000); // 10k msg/s, far above the 600 msg/s target
  });
});

describe("canSendAs", () => {
  const d = parse(`
domains:
  example.test:
  example.org:
users:
  alice@example.test:
    sendAs: [alice.smith@example.test, "@example.org", boss@remote.test]
  bob@example.test: {}
  dave@example.test: {}
aliases:
  team@example.test: [alice@example.test, bob@example.test]
  all@example.test: [team@example.test]
  info@example.test: [bob@example.test]
  dave@example.test: [dave@example.test, alice@example.test]
`);

  it("allows the user's own address and its plus-addresses, case-insensitively", () => {
    expect(d.canSendAs("alice@example.test", "alice@example.test")).toBe(true);
    expect(d.canSendAs("ALICE@example.test", "Alice@EXAMPLE.TEST")).toBe(true);
    expect(d.canSendAs("alice@example.test", "alice+news@example.test")).toBe(true);
  });

  it("allows sendAs addresses and domains", () => {
    expect(d.canSendAs("alice@example.test", "Alice.Smith@example.test")).toBe(true);
    expect(d.canSendAs("alice@example.test", "anyone@EXAMPLE.org")).toBe(true);
    expect(d.canSendAs("alice@example.test", "boss@remote.test")).toBe(true);
    expect(d.canSendAs("bob@example.test", "anyone@example.org")).toBe(false);
  });

  it("allows aliases that deliver to the user's mailbox, at any depth", () => {
    expect(d.canSendAs("alice@example.test", "team@example.test")).toBe(true);
    expect(d.canSendAs("bob@example.test", "all@example.test")).toBe(true);
    expect(d.canSendAs("bob@example.test", "info+x@example.test")).toBe(true);
    expect(d.canSendAs("alice@example.test", "info@example.test")).toBe(false);
  });

  it("refuses other users' addresses, unknown addresses and unknown senders", () => {
    expect(d.canSendAs("alice@example.test", "bob@example.test")).toBe(false);
    expect(d.canSendAs("alice@example.test", "bob+x@example.test")).toBe(false);
    // dave's alias copies mail to alice, but dave@ is dave's own address
    expect(d.canSendAs("alice@example.test", "dave@example.test")).toBe(false);
    expect(d.canSendAs("alice@example.test", "nobody@example.test")).toBe(false);
    expect(d.canSendAs("alice@example.test", "someone@gmail.test")).toBe(false);
    expect(d.canSendAs("mallory@example.test", "mallory@example.test")).toBe(false);
  });
});
