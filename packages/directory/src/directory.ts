import { createPrivateKey } from "node:crypto";
import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { dirname, resolve as resolvePath } from "node:path";
import { normalizeDomain, parseAddress } from "@mailpipe/contracts";
import { isMap, isScalar, isSeq, LineCounter, parseDocument } from "yaml";
import type { z } from "zod";
import { DirectoryError, type DirectoryIssue } from "./errors.ts";
import { DUMMY_HASH, HASH_FORMAT_MESSAGE, type ParsedHash, parseHash, verifyParsed } from "./password.ts";
import {
  DirectoryFile,
  type DkimAlgorithm,
  DkimEntry,
  DomainEntry,
  formatPath,
  parseSize,
  type SrsEntry,
  UserEntry,
} from "./schema.ts";
import { isSrsLocal, Srs, type SrsReverse } from "./srs.ts";

/** Alias nesting deeper than this is cut off (and reported in `loops`). */
export const MAX_ALIAS_DEPTH = 10;

/** A `+tag` becomes a Maildir folder only when it looks like this. */
const FOLDER_TAG = /^[A-Za-z0-9_-]{1,64}$/;

export interface User {
  /** canonical address: local part lower-cased, domain lower-case ASCII */
  address: string;
  /** effective quota in bytes (the user's, else the domain default); undefined = unlimited */
  quota: number | undefined;
  /** extra addresses (canonical) and `@domain` entries this user may send as */
  sendAs: readonly string[];
  /** false for receive-only users, who cannot log in */
  hasPassword: boolean;
}

export interface LocalRecipient {
  /** the mailbox owner (a user's canonical address) */
  mailbox: string;
  /** the address this copy is for (Delivered-To): the user's address, with its +tag when one was used */
  address: string;
  /** Maildir++ subfolder from a +tag matching /^[A-Za-z0-9_-]{1,64}$/ */
  folder?: string;
}

export interface Resolution {
  /** mailboxes to deliver to, each once */
  local: LocalRecipient[];
  /** alias targets outside our domains (forwarding), each once; the address itself is never here */
  remote: string[];
  /** addresses in our domains with no user or alias (the address itself, or an alias target) */
  unknown: string[];
  /** aliases whose expansion delivered nowhere: they only lead back to themselves (or nest > 10 deep) */
  loops: string[];
  /** the address is not in one of our domains (deliver it remotely); everything else is then empty */
  nonLocal: boolean;
}

export interface ResolveOptions {
  /** separates a local part from its tag (default "+"); "" turns plus-addressing off */
  plusSeparator?: string;
}

export interface DkimKey {
  selector: string;
  algorithm: DkimAlgorithm;
  /** PEM text (already read from privateKeyFile) */
  privateKey: string;
}

/**
 * mailauth's dkimSign options for one signature with `key` for `domain` (relaxed/relaxed), as msa
 * signs submissions and delivery signs TLS reports; `headerList` names the fields to sign when the
 * default set is not enough.
 */
export function dkimSignOptions(domain: string, key: DkimKey, headerList?: string[]) {
  return {
    signingDomain: domain,
    selector: key.selector,
    privateKey: key.privateKey,
    signatureData: [
      {
        signingDomain: domain,
        selector: key.selector,
        privateKey: key.privateKey,
        algorithm: key.algorithm,
        canonicalization: "relaxed/relaxed",
      },
    ],
    ...(headerList ? { headerList } : {}),
  };
}

export interface DomainPolicy {
  /** mx refuses mail failing DMARC when the sender's policy is p=reject */
  enforceDmarc: boolean;
  /** mx refuses an SPF hard fail (-all) at MAIL FROM */
  spfRejectAtMailFrom: boolean;
  /** mda (MDA_BACKEND=maildir) files a message the spam filter marked (X-Spam: Yes…) into Junk */
  spamToJunk: boolean;
}

const DEFAULT_POLICY: Readonly<DomainPolicy> = Object.freeze({
  enforceDmarc: true,
  spfRejectAtMailFrom: false,
  spamToJunk: true,
});

interface DomainInfo {
  quota: number | undefined;
  policy: DomainPolicy;
  dkim: DkimKey | undefined;
}

interface UserRecord {
  user: User;
  password: ParsedHash | undefined;
  sendAsAddresses: ReadonlySet<string>;
  sendAsDomains: ReadonlySet<string>;
}

interface Target {
  /** the lookup key (lower-cased local part) for a local target; the address itself for a remote one */
  key: string;
  local: string;
  domain: string;
  /** the address as it will be delivered: canonical when local, the local part kept as written when remote */
  address: string;
  remote: boolean;
}

type Found =
  | { kind: "alias"; key: string; targets: readonly Target[] }
  | { kind: "user"; mailbox: string; address: string; folder: string | undefined }
  | { kind: "unknown" };

interface ResolveState {
  sep: string;
  out: Resolution;
  mailboxes: Set<string>;
  remote: Set<string>;
  unknown: Set<string>;
  loops: Set<string>;
  chain: Set<string>;
  expanded: Map<string, boolean>;
}

function keyOf(local: string, domain: string): string {
  return `${local.toLowerCase()}@${domain}`;
}

function splitTag(local: string, sep: string): { base: string; tag: string } | null {
  if (sep === "" || local.startsWith('"')) return null;
  const at = local.indexOf(sep);
  if (at <= 0) return null;
  return { base: local.slice(0, at), tag: local.slice(at + sep.length) };
}

/** The domain after the last @, normalised, or null. */
function domainOf(address: string): string | null {
  const at = address.lastIndexOf("@");
  return at < 0 ? null : normalizeDomain(address.slice(at + 1));
}

type Path = (string | number)[];

/** Line and column of the deepest node along `path` that exists (the key, for mapping entries). */
function locate(
  doc: ReturnType<typeof parseDocument>,
  counter: LineCounter,
  path: readonly PropertyKey[],
): { line?: number; column?: number } {
  let node: unknown = doc.contents;
  let offset: number | undefined;
  for (const seg of path) {
    if (isMap(node)) {
      const pair = node.items.find((p) => (isScalar(p.key) ? String(p.key.value) : String(p.key)) === seg);
      if (!pair) break;
      const keyRange = isScalar(pair.key) ? pair.key.range : undefined;
      if (keyRange) offset = keyRange[0];
      node = pair.value;
    } else if (isSeq(node) && typeof seg === "number") {
      const item = node.items[seg] as { range?: [number, number, number] } | undefined;
      if (!item) break;
      if (item.range) offset = item.range[0];
      node = item;
    } else break;
  }
  if (offset === undefined) return {};
  const pos = counter.linePos(offset);
  return { line: pos.line, column: pos.col };
}

/** Keys allowed in the mapping at `path`, for "unknown key" messages. */
function allowedKeys(path: readonly PropertyKey[]): string[] {
  if (path.length === 0) return Object.keys(DirectoryFile.shape);
  if (path[0] === "domains" && path.length === 2) return Object.keys(DomainEntry.unwrap().shape);
  if (path[0] === "domains" && path.length === 3 && path[2] === "dkim") return Object.keys(DkimEntry.shape);
  if (path[0] === "users" && path.length === 2) return Object.keys(UserEntry.unwrap().shape);
  return [];
}

function zodIssues(issues: readonly z.core.$ZodIssue[]): { path: PropertyKey[]; message: string }[] {
  const out: { path: PropertyKey[]; message: string }[] = [];
  for (const issue of issues) {
    if (issue.code === "unrecognized_keys") {
      const allowed = allowedKeys(issue.path);
      const hint = allowed.length ? ` (expected one of: ${allowed.join(", ")})` : "";
      for (const key of issue.keys) out.push({ path: [...issue.path, key], message: `unknown key${hint}` });
    } else {
      out.push({ path: issue.path, message: issue.message });
    }
  }
  return out;
}

/**
 * The directory: domains, users, aliases, DKIM keys and quotas, immutable once built. Lookups are Map
 * gets on canonical keys (local part lower-cased, domain lower-case ASCII).
 */
export class Directory {
  /** the file this was loaded from, when it was */
  readonly file: string | undefined;
  /** every file read to build this: the directory file and the DKIM key files */
  readonly files: readonly string[];
  readonly #domains: ReadonlyMap<string, DomainInfo>;
  readonly #users: ReadonlyMap<string, UserRecord>;
  readonly #aliases: ReadonlyMap<string, readonly Target[]>;
  readonly #srs: Srs | undefined;

  private constructor(
    file: string | undefined,
    files: string[],
    domains: Map<string, DomainInfo>,
    users: Map<string, UserRecord>,
    aliases: Map<string, Target[]>,
    srs: Srs | undefined,
  ) {
    this.file = file;
    this.files = files;
    this.#domains = domains;
    this.#users = users;
    this.#aliases = aliases;
    this.#srs = srs;
  }

  /** Reads and validates a directory file; DKIM key paths are relative to its folder. */
  static async load(file: string): Promise<Directory> {
    let text: string;
    try {
      text = await readFile(file, "utf8");
    } catch (err) {
      throw new DirectoryError(file, [
        { path: "", message: `cannot read the file: ${(err as Error).message}` },
      ]);
    }
    return Directory.fromYaml(text, dirname(resolvePath(file)), { file });
  }

  /**
   * Builds a directory from YAML text. `baseDir` resolves relative `privateKeyFile` paths (key files are
   * read here, synchronously). `file` names the source in error messages. Throws a DirectoryError.
   */
  static fromYaml(text: string, baseDir: string = process.cwd(), opts: { file?: string } = {}): Directory {
    const name = opts.file ?? "directory";
    const counter = new LineCounter();
    const doc = parseDocument(text, { lineCounter: counter, prettyErrors: true, uniqueKeys: true });
    if (doc.errors.length > 0) {
      throw new DirectoryError(
        name,
        doc.errors.map((e) => ({
          path: "",
          message: `YAML syntax: ${e.message.split("\n")[0]!.replace(/ at line \d+, column \d+:?$/, "")}`,
          line: e.linePos?.[0].line,
          column: e.linePos?.[0].col,
        })),
      );
    }
    const issues: DirectoryIssue[] = [];
    const report = (path: Path, message: string) =>
      issues.push({ path: formatPath(path), message, ...locate(doc, counter, path) });

    let raw: unknown;
    try {
      raw = doc.toJS({ maxAliasCount: 100 });
    } catch (err) {
      throw new DirectoryError(name, [{ path: "", message: `YAML: ${(err as Error).message}` }]);
    }
    if (raw === null || raw === undefined) {
      throw new DirectoryError(name, [
        { path: "", message: "the file is empty (expected domains, users, aliases)" },
      ]);
    }
    const parsed = DirectoryFile.safeParse(raw);
    if (!parsed.success) {
      for (const i of zodIssues(parsed.error.issues)) report(i.path as Path, i.message);
      throw new DirectoryError(name, issues);
    }
    const data = parsed.data;
    const files: string[] = opts.file ? [resolvePath(opts.file)] : [];

    // domains
    const domains = new Map<string, DomainInfo>();
    const domainKeyOf = new Map<string, string>();
    for (const [key, entry] of Object.entries(data.domains ?? {})) {
      const domain = normalizeDomain(key);
      if (domain === null) {
        report(["domains", key], "not a valid domain name");
        continue;
      }
      const first = domainKeyOf.get(domain);
      if (first !== undefined) {
        report(["domains", key], `the same domain as "${first}" (domains compare case-insensitively)`);
        continue;
      }
      domainKeyOf.set(domain, key);
      let dkim: DkimKey | undefined;
      if (entry?.dkim) dkim = readDkim(entry.dkim, ["domains", key, "dkim"], baseDir, files, report);
      domains.set(domain, {
        quota: entry?.quota === undefined ? undefined : (parseSize(entry.quota) ?? undefined),
        policy: {
          enforceDmarc: entry?.enforceDmarc ?? DEFAULT_POLICY.enforceDmarc,
          spfRejectAtMailFrom: entry?.spfRejectAtMailFrom ?? DEFAULT_POLICY.spfRejectAtMailFrom,
          spamToJunk: entry?.spamToJunk ?? DEFAULT_POLICY.spamToJunk,
        },
        dkim,
      });
    }

    /** A user or alias key: a valid address in one of our domains, not seen before. */
    const seen = new Map<string, string>();
    const localKey = (section: "users" | "aliases", key: string): string | null => {
      const addr = parseAddress(key.trim());
      if (!addr) {
        report([section, key], "not a valid address (local@domain)");
        return null;
      }
      if (!domains.has(addr.domain)) {
        report([section, key], `domain "${addr.domain}" is not listed under domains`);
        return null;
      }
      const canonical = keyOf(addr.local, addr.domain);
      const first = seen.get(`${section} ${canonical}`);
      if (first !== undefined) {
        report([section, key], `the same address as "${first}" (local parts compare case-insensitively)`);
        return null;
      }
      seen.set(`${section} ${canonical}`, key);
      return canonical;
    };

    // users
    const users = new Map<string, UserRecord>();
    for (const [key, entry] of Object.entries(data.users ?? {})) {
      const address = localKey("users", key);
      let password: ParsedHash | undefined;
      if (entry?.password !== undefined) {
        password = parseHash(entry.password) ?? undefined;
        if (!password) report(["users", key, "password"], HASH_FORMAT_MESSAGE);
      }
      const sendAs: string[] = [];
      const sendAsAddresses = new Set<string>();
      const sendAsDomains = new Set<string>();
      for (const [i, s] of (entry?.sendAs ?? []).entries()) {
        const value = s.trim();
        if (value.startsWith("@")) {
          const d = normalizeDomain(value.slice(1));
          if (d === null) {
            report(["users", key, "sendAs", i], "not a valid @domain");
            continue;
          }
          sendAsDomains.add(d);
          sendAs.push(`@${d}`);
        } else {
          const a = parseAddress(value);
          if (!a) {
            report(["users", key, "sendAs", i], "not a valid address or @domain");
            continue;
          }
          const k = keyOf(a.local, a.domain);
          sendAsAddresses.add(k);
          sendAs.push(k);
        }
      }
      if (address === null) continue;
      const domainQuota = domains.get(address.slice(address.lastIndexOf("@") + 1))?.quota;
      const quota =
        entry?.quota === "unlimited"
          ? undefined
          : entry?.quota !== undefined
            ? (parseSize(entry.quota) ?? undefined)
            : domainQuota;
      users.set(address, {
        user: { address, quota, sendAs, hasPassword: password !== undefined },
        password,
        sendAsAddresses,
        sendAsDomains,
      });
    }

    // aliases
    const aliases = new Map<string, Target[]>();
    for (const [key, entry] of Object.entries(data.aliases ?? {})) {
      const address = localKey("aliases", key);
      const list = typeof entry === "string" ? [entry] : entry;
      const targets: Target[] = [];
      for (const [i, t] of list.entries()) {
        const path: Path = typeof entry === "string" ? ["aliases", key] : ["aliases", key, i];
        const a = parseAddress(t.trim());
        if (!a) {
          report(path, "not a valid address (local@domain)");
          continue;
        }
        const remote = !domains.has(a.domain);
        const k = remote ? a.address : keyOf(a.local, a.domain);
        targets.push({ key: k, local: a.local, domain: a.domain, address: k, remote });
      }
      if (address !== null) aliases.set(address, targets);
    }

    // SRS
    let srs: Srs | undefined;
    if (data.srs) {
      const secrets = readSrsSecrets(data.srs, baseDir, files, report);
      if (secrets) srs = new Srs({ secrets, maxAgeDays: data.srs.maxAgeDays });
    }

    if (issues.length > 0) throw new DirectoryError(name, issues);
    return new Directory(opts.file, files, domains, users, aliases, srs);
  }

  // --- domains ---------------------------------------------------------------------------------------

  /** Whether mail for this domain is ours (case-insensitive; IDNs in either form). */
  isLocalDomain(domain: string): boolean {
    const d = normalizeDomain(domain);
    return d !== null && this.#domains.has(d);
  }

  /** Our domains, sorted. */
  domains(): string[] {
    return [...this.#domains.keys()].sort();
  }

  /** SRS, when the directory configures it: senders of mail forwarded elsewhere are rewritten. */
  srs(): Srs | undefined {
    return this.#srs;
  }

  /**
   * An SRS address of one of our domains (`SRS0=…@example.test`): what it stands for, or why it is
   * refused (forged, expired, or no SRS configured). Undefined for any other address.
   */
  srsReverse(address: string, now: number = Date.now()): SrsReverse | undefined {
    const a = parseAddress(address.trim());
    if (!a || !this.#domains.has(a.domain) || !isSrsLocal(a.local)) return undefined;
    if (this.#find(a.local, a.domain, "").kind !== "unknown") return undefined; // a real user or alias
    return this.#srs ? this.#srs.reverse(a.local, now) : { ok: false, reason: "forged" };
  }

  /** The DKIM signing key for a domain, if it has one. */
  dkim(domain: string): DkimKey | undefined {
    const d = normalizeDomain(domain);
    return d === null ? undefined : this.#domains.get(d)?.dkim;
  }

  /** The inbound policy for one of our domains (defaults for any other). */
  domainPolicy(domain: string): DomainPolicy {
    const d = normalizeDomain(domain);
    return { ...((d !== null && this.#domains.get(d)?.policy) || DEFAULT_POLICY) };
  }

  // --- users -----------------------------------------------------------------------------------------

  /** The user with exactly this address (case-insensitive; a +tag is not stripped). */
  user(address: string): User | undefined {
    return this.#record(address)?.user;
  }

  hasUser(address: string): boolean {
    return this.#record(address) !== undefined;
  }

  /** All user addresses, sorted. */
  users(): string[] {
    return [...this.#users.keys()].sort();
  }

  /** All alias addresses, sorted. */
  aliases(): string[] {
    return [...this.#aliases.keys()].sort();
  }

  /** A mailbox's quota in bytes (a +tag is stripped); undefined when unlimited or not a user. */
  quota(address: string): number | undefined {
    const rec = this.#record(address);
    if (rec) return rec.user.quota;
    const a = parseAddress(address.trim());
    const tagged = a && splitTag(a.local, "+");
    return tagged ? this.#users.get(keyOf(tagged.base, a.domain))?.user.quota : undefined;
  }

  #record(address: string): UserRecord | undefined {
    const a = parseAddress(address.trim());
    return a ? this.#users.get(keyOf(a.local, a.domain)) : undefined;
  }

  /**
   * Checks a login. Always runs exactly one scrypt (against a dummy hash for unknown users and users
   * without a password), so the answer time does not reveal which users exist.
   */
  async verifyPassword(address: string, password: string): Promise<boolean> {
    const rec = this.#record(address);
    if (!rec?.password || password.length === 0) {
      await verifyParsed(DUMMY_HASH, password);
      return false;
    }
    return verifyParsed(rec.password, password);
  }

  /**
   * Whether an authenticated user may use `fromAddress` (envelope or header From): the user's own address
   * and its +tags, its `sendAs` addresses and `@domain`s, and aliases (not users) that deliver to its mailbox.
   */
  canSendAs(userAddress: string, fromAddress: string): boolean {
    const rec = this.#record(userAddress);
    const from = parseAddress(fromAddress.trim());
    if (!rec || !from) return false;
    const me = rec.user.address;
    const fromKey = keyOf(from.local, from.domain);
    if (fromKey === me) return true;
    if (rec.sendAsAddresses.has(fromKey) || rec.sendAsDomains.has(from.domain)) return true;
    if (!this.#domains.has(from.domain)) return false;
    const tagged = splitTag(from.local, "+");
    if (tagged && keyOf(tagged.base, from.domain) === me) return true;
    // another user's address is theirs, even when an alias of the same name forwards to us
    if (this.#users.has(fromKey) || (tagged && this.#users.has(keyOf(tagged.base, from.domain))))
      return false;
    const found = this.#find(from.local, from.domain, "+");
    if (found.kind !== "alias") return false;
    return this.resolve(fromAddress).local.some((l) => l.mailbox === me);
  }

  // --- recipients ------------------------------------------------------------------------------------

  /** The SMTP RCPT check: users, aliases and +tagged forms of either are "ok". */
  acceptsRecipient(address: string): "ok" | "unknown-user" | "not-local" | "srs-invalid" {
    const a = parseAddress(address.trim());
    if (!a) {
      const d = domainOf(address.trim());
      return d !== null && this.#domains.has(d) ? "unknown-user" : "not-local";
    }
    if (!this.#domains.has(a.domain)) return "not-local";
    if (this.#find(a.local, a.domain, "+").kind !== "unknown") return "ok";
    const srs = this.srsReverse(a.address);
    if (srs) return srs.ok ? "ok" : "srs-invalid";
    return "unknown-user";
  }

  /**
   * Where mail for `address` goes: aliases expanded recursively (at most 10 levels, loops cut), +tags
   * resolved, each mailbox once. See Resolution for the parts.
   */
  resolve(address: string, opts: ResolveOptions = {}): Resolution {
    const out: Resolution = { local: [], remote: [], unknown: [], loops: [], nonLocal: false };
    const trimmed = address.trim();
    const a = parseAddress(trimmed);
    if (!a) {
      const d = domainOf(trimmed);
      if (d !== null && this.#domains.has(d)) out.unknown.push(trimmed);
      else out.nonLocal = true;
      return out;
    }
    if (!this.#domains.has(a.domain)) {
      out.nonLocal = true;
      return out;
    }
    // a reply or bounce to a sender we rewrote goes back to that sender
    const srs = this.srsReverse(a.address);
    if (srs) {
      if (srs.ok) out.remote.push(srs.address);
      else out.unknown.push(a.address);
      return out;
    }
    const st: ResolveState = {
      sep: opts.plusSeparator ?? "+",
      out,
      mailboxes: new Set(),
      remote: new Set(),
      unknown: new Set(),
      loops: new Set(),
      chain: new Set(),
      expanded: new Map(),
    };
    this.#expand(a.local, a.domain, a.address, 0, st);
    out.loops = [...st.loops];
    return out;
  }

  /** What an address in one of our domains is: exact match first, then without its +tag. */
  #find(local: string, domain: string, sep: string): Found {
    const key = keyOf(local, domain);
    const alias = this.#aliases.get(key);
    if (alias) return { kind: "alias", key, targets: alias };
    if (this.#users.has(key)) return { kind: "user", mailbox: key, address: key, folder: undefined };
    const tagged = splitTag(local, sep);
    if (tagged) {
      const base = keyOf(tagged.base, domain);
      const baseAlias = this.#aliases.get(base);
      if (baseAlias) return { kind: "alias", key: base, targets: baseAlias };
      if (this.#users.has(base)) {
        const folder = FOLDER_TAG.test(tagged.tag) ? tagged.tag : undefined;
        return { kind: "user", mailbox: base, address: key, folder };
      }
    }
    return { kind: "unknown" };
  }

  #addLocal(st: ResolveState, mailbox: string, address: string, folder: string | undefined): void {
    if (st.mailboxes.has(mailbox)) return;
    st.mailboxes.add(mailbox);
    st.out.local.push(folder === undefined ? { mailbox, address } : { mailbox, address, folder });
  }

  /** Expands one local address; true when it led somewhere (a mailbox, a remote or an unknown address). */
  #expand(local: string, domain: string, address: string, depth: number, st: ResolveState): boolean {
    const found = this.#find(local, domain, st.sep);
    if (found.kind === "user") {
      this.#addLocal(st, found.mailbox, found.address, found.folder);
      return true;
    }
    if (found.kind === "unknown") {
      if (!st.unknown.has(address)) {
        st.unknown.add(address);
        st.out.unknown.push(address);
      }
      return true;
    }
    const { key, targets } = found;
    if (st.chain.has(key)) return false;
    const memo = st.expanded.get(key);
    if (memo !== undefined) return memo;
    if (depth >= MAX_ALIAS_DEPTH) {
      st.loops.add(key);
      return false;
    }
    st.chain.add(key);
    let productive = false;
    for (const t of targets) {
      if (t.remote) {
        if (!st.remote.has(t.key)) {
          st.remote.add(t.key);
          st.out.remote.push(t.address);
        }
        productive = true;
      } else if (t.key === key) {
        // an alias listing itself keeps a copy for the user of the same name (Postfix behaviour)
        if (this.#users.has(key)) {
          this.#addLocal(st, key, key, undefined);
          productive = true;
        }
      } else if (this.#expand(t.local, t.domain, t.address, depth + 1, st)) {
        productive = true;
      }
    }
    st.chain.delete(key);
    st.expanded.set(key, productive);
    if (!productive) st.loops.add(key);
    return productive;
  }
}

function readSrsSecrets(
  entry: SrsEntry,
  baseDir: string,
  files: string[],
  report: (path: Path, message: string) => void,
): string[] | undefined {
  if (entry.secrets) return entry.secrets;
  const file = resolvePath(baseDir, entry.secretFile!);
  files.push(file);
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    report(["srs", "secretFile"], `cannot read ${file}${code ? ` (${code})` : ""}`);
    return undefined;
  }
  const secrets = text
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l !== "" && !l.startsWith("#"));
  if (secrets.length === 0 || secrets.some((x) => x.length < 16)) {
    report(["srs", "secretFile"], `${file} must hold one secret of at least 16 characters per line`);
    return undefined;
  }
  return secrets;
}

function readDkim(
  entry: DkimEntry,
  path: Path,
  baseDir: string,
  files: string[],
  report: (path: Path, message: string) => void,
): DkimKey | undefined {
  let pem: string;
  let where: Path;
  if (entry.privateKeyFile !== undefined) {
    const file = resolvePath(baseDir, entry.privateKeyFile);
    where = [...path, "privateKeyFile"];
    files.push(file);
    try {
      pem = readFileSync(file, "utf8");
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      report(where, `cannot read ${file}${code ? ` (${code})` : ""}`);
      return undefined;
    }
  } else {
    pem = entry.privateKey!;
    where = [...path, "privateKey"];
  }
  let type: string | undefined;
  let bits: number | undefined;
  try {
    const key = createPrivateKey(pem);
    type = key.asymmetricKeyType;
    bits = key.asymmetricKeyDetails?.modulusLength;
  } catch {
    report(where, "is not a PEM private key");
    return undefined;
  }
  const algorithm: DkimAlgorithm | undefined =
    type === "rsa" ? "rsa-sha256" : type === "ed25519" ? "ed25519-sha256" : undefined;
  if (!algorithm) {
    report(where, `holds a ${type ?? "unknown"} key; DKIM signs with RSA or Ed25519`);
    return undefined;
  }
  if (entry.algorithm !== undefined && entry.algorithm !== algorithm) {
    report([...path, "algorithm"], `is ${entry.algorithm} but the key is ${type} (use ${algorithm})`);
    return undefined;
  }
  if (type === "rsa" && bits !== undefined && bits < 1024) {
    report(where, `RSA key has ${bits} bits; DKIM needs at least 1024 (RFC 8301), 2048 recommended`);
    return undefined;
  }
  return { selector: entry.selector.toLowerCase(), algorithm, privateKey: pem };
}
