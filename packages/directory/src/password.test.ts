import type * as crypto from "node:crypto";
import { beforeEach, describe, expect, it, vi } from "vitest";
import { testHash } from "../test/helpers.ts";
import { Directory } from "./directory.ts";
import { DEFAULT_SCRYPT, hashPassword, verifyHash } from "./password.ts";

// count the scrypt runs (and their cost) while still running the real function
const runs: { N: number | undefined }[] = [];
vi.mock("node:crypto", async (importOriginal) => {
  const real = await importOriginal<typeof import("node:crypto")>();
  return {
    ...real,
    scrypt: (...args: Parameters<typeof real.scrypt>) => {
      runs.push({ N: (args[3] as crypto.ScryptOptions | undefined)?.N });
      return (real.scrypt as (...a: unknown[]) => void)(...args);
    },
  };
});

beforeEach(() => {
  runs.length = 0;
});

describe("hashPassword / verifyHash", () => {
  it("produces a salted PHC scrypt string with the default cost that verifies", async () => {
    const hash = await hashPassword("correct horse");
    expect(hash).toMatch(/^\$scrypt\$ln=15,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$/);
    expect(await verifyHash(hash, "correct horse")).toBe(true);
    expect(await verifyHash(hash, "correct horse ")).toBe(false);
    expect(await hashPassword("correct horse")).not.toBe(hash); // a fresh salt every time
    expect(runs.every((r) => r.N === 2 ** DEFAULT_SCRYPT.ln)).toBe(true);
  });

  it("uses the parameters stored in the hash", async () => {
    const hash = await hashPassword("pw", { ln: 11, r: 4, p: 2 });
    expect(hash.startsWith("$scrypt$ln=11,r=4,p=2$")).toBe(true);
    runs.length = 0;
    expect(await verifyHash(hash, "pw")).toBe(true);
    expect(runs).toEqual([{ N: 2 ** 11 }]);
  });

  it("treats a password the same in composed and decomposed Unicode", async () => {
    const hash = await testHash("caf\u00e9");
    expect(await verifyHash(hash, "cafe\u0301")).toBe(true);
  });

  it("accepts passlib's '.' for '+' and padded base64", async () => {
    const hash = await testHash("pw");
    const [, , params, salt, key] = hash.split("$");
    const passlib = `$scrypt$${params}$${salt!.replaceAll("+", ".")}$${key!.replaceAll("+", ".")}`;
    expect(await verifyHash(passlib, "pw")).toBe(true);
    const padded = `$scrypt$${params}$${salt}==$${key}=`;
    expect(await verifyHash(padded, "pw")).toBe(true);
  });

  it("refuses malformed hashes and empty passwords", async () => {
    await expect(verifyHash("hunter2", "hunter2")).rejects.toThrow(/not a scrypt password hash/);
    await expect(verifyHash("$2b$10$abcdefghijklmnopqrstuv", "x")).rejects.toThrow(/not a scrypt/);
    await expect(hashPassword("")).rejects.toThrow(/empty/);
    await expect(hashPassword("x", { ln: 40 })).rejects.toThrow(/ln must be/);
  });
});

describe("Directory.verifyPassword", () => {
  it("accepts the right password, refuses a wrong one, and runs one full-cost scrypt for unknown users", async () => {
    const d = Directory.fromYaml(
      `domains:\n  example.test:\nusers:\n  alice@example.test:\n    password: "${await testHash("s3cret")}"\n  bob@example.test: {}\n`,
      "/nonexistent",
    );
    runs.length = 0;
    expect(await d.verifyPassword("alice@example.test", "s3cret")).toBe(true);
    expect(await d.verifyPassword("ALICE@Example.Test", "s3cret")).toBe(true);
    expect(await d.verifyPassword("alice@example.test", "S3cret")).toBe(false);
    expect(await d.verifyPassword("alice@example.test", "")).toBe(false);
    expect(runs).toHaveLength(4);

    runs.length = 0;
    expect(await d.verifyPassword("nobody@example.test", "s3cret")).toBe(false);
    expect(await d.verifyPassword("alice@elsewhere.test", "s3cret")).toBe(false);
    expect(await d.verifyPassword("bob@example.test", "")).toBe(false); // receive-only user
    expect(await d.verifyPassword("not an address", "x")).toBe(false);
    // the dummy check costs what a default hash costs, so timing does not tell users apart
    expect(runs).toEqual(Array(4).fill({ N: 2 ** DEFAULT_SCRYPT.ln }));
  });
});
