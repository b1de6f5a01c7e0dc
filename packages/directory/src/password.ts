import { randomBytes, type ScryptOptions, scrypt, timingSafeEqual } from "node:crypto";

/**
 * Password hashes: PHC-style scrypt strings `$scrypt$ln=15,r=8,p=1$<salt>$<hash>` (standard base64, no
 * padding; N = 2^ln). Only salted scrypt hashes are accepted anywhere, never plain text.
 */

export interface ScryptParams {
  /** log2 of the CPU/memory cost N (default 15: 32 MiB and roughly 50-100 ms per check) */
  ln: number;
  /** block size (default 8) */
  r: number;
  /** parallelism (default 1) */
  p: number;
}

export interface ParsedHash extends ScryptParams {
  salt: Buffer;
  hash: Buffer;
}

export const DEFAULT_SCRYPT: Readonly<ScryptParams> = { ln: 15, r: 8, p: 1 };

/** Hashes above this much scrypt memory are refused (a hostile file must not exhaust the host). */
const MAX_SCRYPT_MEMORY = 512 * 1024 * 1024;

const PHC =
  /^\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})\$([A-Za-z0-9+/.]+={0,2})\$([A-Za-z0-9+/.]+={0,2})$/;

export const HASH_FORMAT_MESSAGE =
  "must be a salted scrypt hash $scrypt$ln=<n>,r=<r>,p=<p>$<salt>$<hash> (plain-text passwords are " +
  "not accepted; make one with hashPassword() or mailctl)";

function b64(text: string): Buffer {
  return Buffer.from(text.replaceAll(".", "+"), "base64");
}

function checkParams({ ln, r, p }: ScryptParams): string | null {
  if (!Number.isInteger(ln) || ln < 1 || ln > 24) return "ln must be between 1 and 24";
  if (!Number.isInteger(r) || r < 1 || r > 64) return "r must be between 1 and 64";
  if (!Number.isInteger(p) || p < 1 || p > 16) return "p must be between 1 and 16";
  if (128 * 2 ** ln * r > MAX_SCRYPT_MEMORY) return "parameters need more than 512 MiB";
  return null;
}

/** The parts of a scrypt hash string, or null when it is not a well-formed one. */
export function parseHash(text: string): ParsedHash | null {
  const m = PHC.exec(text);
  if (!m) return null;
  const params = { ln: Number(m[1]), r: Number(m[2]), p: Number(m[3]) };
  if (checkParams(params) !== null) return null;
  const salt = b64(m[4]!);
  const hash = b64(m[5]!);
  if (salt.length < 8 || hash.length < 16 || hash.length > 64) return null;
  return { ...params, salt, hash };
}

function derive(password: string, salt: Buffer, keylen: number, { ln, r, p }: ScryptParams): Promise<Buffer> {
  const N = 2 ** ln;
  // Node refuses when 128 * N * r exceeds maxmem (default 32 MiB, exactly what ln=15,r=8 needs)
  const options: ScryptOptions = { N, r, p, maxmem: 256 * N * r + 128 * r * p + 1024 * 1024 };
  return new Promise((resolve, reject) => {
    scrypt(password.normalize("NFC"), salt, keylen, options, (err, key) =>
      err ? reject(err) : resolve(key),
    );
  });
}

/** A new `$scrypt$…` hash of a password with a random 16-byte salt and a 32-byte key. */
export async function hashPassword(password: string, opts: Partial<ScryptParams> = {}): Promise<string> {
  if (password.length === 0) throw new Error("refusing to hash an empty password");
  const params = { ...DEFAULT_SCRYPT, ...opts };
  const problem = checkParams(params);
  if (problem) throw new Error(`bad scrypt parameters: ${problem}`);
  const salt = randomBytes(16);
  const key = await derive(password, salt, 32, params);
  const enc = (b: Buffer) => b.toString("base64").replace(/=+$/, "");
  return `$scrypt$ln=${params.ln},r=${params.r},p=${params.p}$${enc(salt)}$${enc(key)}`;
}

/** Checks a password against a parsed hash in constant time (for equal lengths). */
export async function verifyParsed(parsed: ParsedHash, password: string): Promise<boolean> {
  const key = await derive(password, parsed.salt, parsed.hash.length, parsed);
  return timingSafeEqual(key, parsed.hash);
}

/** Whether `password` matches a `$scrypt$…` hash. Throws when `hash` is not a well-formed scrypt hash. */
export async function verifyHash(hash: string, password: string): Promise<boolean> {
  const parsed = parseHash(hash);
  if (!parsed) throw new Error(`not a scrypt password hash: ${HASH_FORMAT_MESSAGE}`);
  return verifyParsed(parsed, password);
}

/**
 * Checked against when the user does not exist (or has no password), so that answering "no" costs the
 * same scrypt run as a wrong password. Its key is all zeros: no password is known to produce it, and the
 * caller ignores the outcome anyway.
 */
export const DUMMY_HASH: ParsedHash = {
  ...DEFAULT_SCRYPT,
  salt: Buffer.from("mailpipe-dummy-salt!"),
  hash: Buffer.alloc(32),
};
