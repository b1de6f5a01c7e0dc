import { randomBytes } from "node:crypto";
import { open, readFile, realpath, rename, rm, stat } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { normalizeDomain, parseAddress } from "@mailpipe/contracts";
import {
  type Document,
  isMap,
  isScalar,
  isSeq,
  type Pair,
  parseDocument,
  Scalar,
  visit,
  YAMLMap,
} from "yaml";
import { Directory } from "./directory.ts";
import { DirectoryError } from "./errors.ts";
import type { DkimAlgorithm } from "./schema.ts";

/**
 * Edits for the operator CLI. Each reads the file with the `yaml` Document API (so comments, ordering and
 * layout survive), changes only what it must, validates the result exactly as a service would load it,
 * and only then replaces the file atomically (temp file in the same folder, fsync, rename). Edits of one
 * file within a process run one at a time. A symlinked file is written through to its target.
 */

export interface UserChanges {
  /** a `$scrypt$…` hash from hashPassword(); plain text is refused by validation */
  passwordHash?: string;
  /** bytes or a size such as "500M"; "unlimited" lifts the domain default; null removes the setting */
  quota?: number | string | null;
}

export interface DkimSettings {
  selector: string;
  algorithm: DkimAlgorithm;
  /** written as given: relative paths are relative to the directory file */
  privateKeyFile: string;
}

const locks = new Map<string, Promise<unknown>>();

async function serialised<T>(key: string, work: () => Promise<T>): Promise<T> {
  const before = locks.get(key) ?? Promise.resolve();
  const run = before.then(work, work);
  const tail = run.catch(() => undefined);
  locks.set(key, tail);
  try {
    return await run;
  } finally {
    if (locks.get(key) === tail) locks.delete(key);
  }
}

async function writeAtomic(target: string, text: string): Promise<void> {
  let mode = 0o600;
  try {
    mode = (await stat(target)).mode & 0o777;
  } catch {
    // a new file: owner-only, since it holds password hashes
  }
  const tmp = join(
    dirname(target),
    `.${basename(target)}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`,
  );
  const fh = await open(tmp, "wx", mode);
  try {
    await fh.writeFile(text, "utf8");
    await fh.chmod(mode);
    await fh.sync();
  } catch (err) {
    await fh.close();
    await rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  try {
    await rename(tmp, target);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  try {
    const dir = await open(dirname(target), "r");
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  } catch {
    // some file systems cannot fsync a folder; the rename itself is atomic
  }
}

/** Reads, edits, validates and writes one directory file; `edit` returns false for "nothing to do". */
async function editFile<T>(
  file: string,
  edit: (doc: Document) => T,
  opts: { create?: boolean } = {},
): Promise<T> {
  const path = resolve(file);
  return serialised(path, async () => {
    let target = path;
    let text = "";
    try {
      target = await realpath(path);
      text = await readFile(target, "utf8");
    } catch (err) {
      if (!(opts.create && (err as NodeJS.ErrnoException).code === "ENOENT")) {
        throw new DirectoryError(file, [
          { path: "", message: `cannot read the file: ${(err as Error).message}` },
        ]);
      }
    }
    const doc = parseDocument(text);
    if (doc.errors.length > 0) Directory.fromYaml(text, dirname(path), { file }); // throws, naming the line
    keepKeyLineComments(doc, text);
    const result = edit(doc);
    if (result === false) return result;
    const out = doc.toString({ flowCollectionPadding: false, lineWidth: 0 });
    Directory.fromYaml(out, dirname(path), { file }); // throws a DirectoryError and nothing is written
    await writeAtomic(target, out);
    return result;
  });
}

/**
 * `key: # comment` above a block mapping or sequence parses as a comment before the value, which the
 * `yaml` library would print on a line of its own. Moves such comments back onto the key's line.
 */
function keepKeyLineComments(doc: Document, source: string): void {
  visit(doc, {
    Pair(_, pair) {
      const { key, value } = pair;
      if (!isScalar(key) || !key.range || key.comment || !(isMap(value) || isSeq(value))) return;
      if (value.flow || !value.commentBefore || !value.range) return;
      const between = source.slice(key.range[1], value.range[0]);
      const hash = between.indexOf("#");
      if (hash < 0 || between.slice(0, hash).includes("\n")) return;
      const [first, ...rest] = value.commentBefore.split("\n");
      key.comment = first;
      value.commentBefore = rest.length > 0 ? rest.join("\n") : undefined;
    },
  });
}

/** The top-level mapping `name`, created (block style) when missing or empty. */
function section(doc: Document, name: string, file: string): YAMLMap {
  if (doc.contents === null || (isScalar(doc.contents) && doc.contents.value === null)) {
    doc.contents = new YAMLMap() as never;
  }
  if (!isMap(doc.contents))
    throw new DirectoryError(file, [{ path: "", message: "the file is not a mapping" }]);
  const found = doc.contents.get(name, true);
  if (isMap(found)) return found;
  if (found !== undefined && !(isScalar(found) && found.value === null)) {
    throw new DirectoryError(file, [{ path: name, message: "is not a mapping" }]);
  }
  const map = new YAMLMap();
  doc.contents.set(name, map);
  return map;
}

function findPair(map: YAMLMap, matches: (key: string) => boolean): Pair | undefined {
  return (map.items as Pair[]).find((p) => matches(isScalar(p.key) ? String(p.key.value) : String(p.key)));
}

/** The mapping held by `pair`, replacing an empty value (`key:` or `key: {}`) with a block mapping. */
function mapValue(pair: Pair, what: string, file: string): YAMLMap {
  if (isMap(pair.value)) {
    if (pair.value.items.length === 0) pair.value.flow = false;
    return pair.value;
  }
  if (pair.value === null || (isScalar(pair.value) && pair.value.value === null)) {
    const map = new YAMLMap();
    pair.value = map;
    return map;
  }
  throw new DirectoryError(file, [{ path: what, message: "is not a mapping" }]);
}

function addPair(map: YAMLMap, key: string, value: unknown): void {
  if (map.items.length === 0) map.flow = false;
  map.set(key, value);
}

function quoted(value: string): Scalar {
  const s = new Scalar(value);
  s.type = Scalar.QUOTE_DOUBLE;
  return s;
}

function localAddress(address: string, file: string): { key: string; domain: string } {
  const a = parseAddress(address.trim());
  if (!a) throw new DirectoryError(file, [{ path: "", message: `"${address}" is not a valid address` }]);
  return { key: `${a.local.toLowerCase()}@${a.domain}`, domain: a.domain };
}

function sameAddress(key: string): (written: string) => boolean {
  return (written) => {
    const a = parseAddress(written.trim());
    return a !== null && `${a.local.toLowerCase()}@${a.domain}` === key;
  };
}

function sameDomain(domain: string): (written: string) => boolean {
  return (written) => normalizeDomain(written) === domain;
}

/**
 * Creates a user or updates one (matching its address case-insensitively). The user's domain must be
 * listed under `domains`. Resolves to "created" or "updated".
 */
export async function setUser(
  file: string,
  address: string,
  changes: UserChanges = {},
): Promise<"created" | "updated"> {
  const { key, domain } = localAddress(address, file);
  return editFile(file, (doc) => {
    const domains = section(doc, "domains", file);
    if (!findPair(domains, sameDomain(domain))) {
      throw new DirectoryError(file, [
        { path: "", message: `domain "${domain}" is not listed under domains (add it first)` },
      ]);
    }
    const users = section(doc, "users", file);
    const existing = findPair(users, sameAddress(key));
    const entry = existing ? mapValue(existing, `users["${key}"]`, file) : new YAMLMap();
    if (changes.passwordHash !== undefined) entry.set("password", quoted(changes.passwordHash));
    if (changes.quota === null) entry.delete("quota");
    else if (changes.quota !== undefined) entry.set("quota", changes.quota);
    if (existing) return "updated" as const;
    if (entry.items.length === 0) entry.flow = true;
    addPair(users, key, entry);
    return "created" as const;
  });
}

/** Removes a user (not the aliases naming it). Resolves to false when there was no such user. */
export async function removeUser(file: string, address: string): Promise<boolean> {
  const { key } = localAddress(address, file);
  return editFile(file, (doc) => {
    const users = section(doc, "users", file);
    const existing = findPair(users, sameAddress(key));
    if (!existing) return false;
    users.items.splice(users.items.indexOf(existing), 1);
    return true;
  });
}

/**
 * Sets a domain's DKIM key (replacing an inline privateKey). The key file must already exist: the result
 * is validated, which reads it. The domain must be listed under `domains`.
 */
export async function setDkim(file: string, domain: string, dkim: DkimSettings): Promise<void> {
  const d = normalizeDomain(domain);
  if (d === null)
    throw new DirectoryError(file, [{ path: "", message: `"${domain}" is not a valid domain` }]);
  return editFile(file, (doc) => {
    const domains = section(doc, "domains", file);
    const pair = findPair(domains, sameDomain(d));
    if (!pair) {
      throw new DirectoryError(file, [{ path: "", message: `domain "${d}" is not listed under domains` }]);
    }
    const entry = mapValue(pair, `domains["${d}"]`, file);
    const current = entry.get("dkim", true);
    if (isMap(current)) {
      current.set("selector", dkim.selector);
      current.set("algorithm", dkim.algorithm);
      current.set("privateKeyFile", dkim.privateKeyFile);
      current.delete("privateKey");
    } else {
      entry.set("dkim", doc.createNode({ ...dkim }));
    }
  });
}

/**
 * Adds a domain with no settings (creating the file when it does not exist). Resolves to false when the
 * domain was already there.
 */
export async function addDomain(file: string, domain: string): Promise<boolean> {
  const d = normalizeDomain(domain);
  if (d === null)
    throw new DirectoryError(file, [{ path: "", message: `"${domain}" is not a valid domain` }]);
  return editFile(
    file,
    (doc) => {
      const domains = section(doc, "domains", file);
      if (findPair(domains, sameDomain(d))) return false;
      const entry = new YAMLMap();
      entry.flow = true;
      addPair(domains, d, entry);
      return true;
    },
    { create: true },
  );
}
