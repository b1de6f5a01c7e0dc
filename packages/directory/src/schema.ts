/**
 * The directory file: every domain, user, alias, DKIM key and quota the mail system knows, in one YAML
 * file (usually `DIRECTORY_FILE`, mounted from a Kubernetes ConfigMap or Secret). It reloads on change.
 *
 * ```yaml
 * domains:
 *   example.test:
 *     dkim:                      # optional
 *       selector: mail
 *       algorithm: rsa-sha256    # or ed25519-sha256; inferred from the key when left out
 *       privateKeyFile: keys/example.test.mail.pem   # relative to the directory file; or privateKey: inline PEM
 *     quota: 1G                  # default per-user quota for this domain (optional)
 *     enforceDmarc: true         # mx refuses DMARC p=reject failures (default true)
 *     spfRejectAtMailFrom: false # mx refuses SPF hard fail (-all) at MAIL FROM (default false)
 *     spamToJunk: true           # mda (Maildir mode) files mail marked as spam into Junk (default true)
 *   example.org:                 # a domain with no settings
 * users:
 *   alice@example.test:
 *     password: "$scrypt$ln=15,r=8,p=1$<salt b64>$<hash b64>"   # only salted scrypt hashes, never plain text
 *     quota: 500M                # optional, overrides the domain default ("unlimited" lifts it)
 *     sendAs: [alice.smith@example.test, "@example.org"]        # extra addresses or whole domains
 *   bob@example.test: {}         # receive-only: no password, cannot log in
 * aliases:
 *   postmaster@example.test: [alice@example.test]
 *   abuse@example.test: alice@example.test                     # one target may be written without [ ]
 *   team@example.test: [alice@example.test, bob@example.test, friend@remote.test]
 * srs:                           # optional: rewrite the sender of mail aliases forward elsewhere
 *   secretFile: srs.secret       # one secret per line, the first signs (or secrets: [...] inline)
 *   maxAgeDays: 21               # how long a bounce to a rewritten sender is accepted (default 21)
 * ```
 *
 * Rules:
 * - Every key is checked; an unknown key is an error that names its path (a typo never passes silently).
 * - Domains are stored lower-case ASCII (IDNs as A-labels); local parts compare case-insensitively, so
 *   `Alice@Example.TEST` and `alice@example.test` are the same user (and writing both is an error).
 * - A user or alias must be in a domain listed under `domains`. Alias targets may be anywhere; targets
 *   outside our domains are forwarded. Aliases may name other aliases (up to 10 levels); an alias that
 *   lists itself also delivers to the user of the same address (Postfix behaviour).
 * - An address may be both a user and an alias: the alias wins (forwarding), unless it lists itself.
 * - Sizes are a whole number of bytes or a number with a binary suffix: K (1024), M (1024²), G (1024³),
 *   T (1024⁴), e.g. `500M`, `1.5G`.
 * - `password` holds a PHC-style scrypt hash `$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>` (base64,
 *   padding optional; passlib's `.` for `+` is accepted). Create one with `hashPassword()` / mailctl.
 * - `sendAs` entries are full addresses or `@domain` (any address of that domain). `@` cannot start a
 *   plain YAML scalar, so quote those: `"@example.org"`.
 * - Plus-addressing: `alice+news@example.test` reaches alice (folder `news`); `team+x@` reaches team.
 */
import { z } from "zod";

export const DKIM_ALGORITHMS = ["rsa-sha256", "ed25519-sha256"] as const;
export type DkimAlgorithm = (typeof DKIM_ALGORITHMS)[number];

const SIZE_UNITS: Record<string, number> = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };
const SIZE = /^(\d+(?:\.\d+)?)\s*([kmgt]?)$/i;

/** Bytes in a size written as a number or `<n>[K|M|G|T]`; null when it is not one (or not positive). */
export function parseSize(value: number | string): number | null {
  if (typeof value === "number") return Number.isSafeInteger(value) && value > 0 ? value : null;
  const m = SIZE.exec(value.trim());
  if (!m) return null;
  const bytes = Math.floor(Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]!);
  return Number.isSafeInteger(bytes) && bytes > 0 ? bytes : null;
}

const SIZE_MESSAGE = "must be a positive size: bytes, or a number with K, M, G or T (e.g. 500M, 1G)";

export const Size = z.union([z.number(), z.string()]).superRefine((v, ctx) => {
  if (parseSize(v) === null) ctx.addIssue({ code: "custom", message: SIZE_MESSAGE });
});

/** A DNS label sequence, as DKIM selectors are (RFC 6376 §3.1). */
const SELECTOR =
  /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

export const DkimEntry = z
  .strictObject({
    selector: z.string().regex(SELECTOR, { message: "must be a DNS label such as mail or 2024a" }),
    algorithm: z.enum(DKIM_ALGORITHMS).optional(),
    privateKeyFile: z.string().min(1).optional(),
    privateKey: z.string().min(1).optional(),
  })
  .superRefine((v, ctx) => {
    if ((v.privateKeyFile === undefined) === (v.privateKey === undefined)) {
      ctx.addIssue({ code: "custom", message: "give exactly one of privateKeyFile or privateKey" });
    }
  });
export type DkimEntry = z.infer<typeof DkimEntry>;

export const DomainEntry = z
  .strictObject({
    dkim: DkimEntry.optional(),
    quota: Size.optional(),
    enforceDmarc: z.boolean().optional(),
    spfRejectAtMailFrom: z.boolean().optional(),
    spamToJunk: z.boolean().optional(),
  })
  .nullable();
export type DomainEntry = z.infer<typeof DomainEntry>;

export const UserEntry = z
  .strictObject({
    password: z.string().optional(),
    quota: z.union([z.literal("unlimited"), Size]).optional(),
    sendAs: z.array(z.string()).optional(),
  })
  .nullable();
export type UserEntry = z.infer<typeof UserEntry>;

export const AliasEntry = z.union([z.string(), z.array(z.string()).min(1)], {
  error: "must be an address or a non-empty list of addresses",
});

/** SRS for forwarded mail: the secrets inline or in a file (one per line), the first signs. */
export const SrsEntry = z
  .strictObject({
    secrets: z
      .array(z.string().min(16, { message: "an SRS secret needs at least 16 characters" }))
      .min(1)
      .optional(),
    secretFile: z.string().min(1).optional(),
    maxAgeDays: z.number().int().min(1).max(1000).optional(),
  })
  .superRefine((v, ctx) => {
    if ((v.secrets === undefined) === (v.secretFile === undefined)) {
      ctx.addIssue({ code: "custom", message: "give exactly one of secrets or secretFile" });
    }
  });
export type SrsEntry = z.infer<typeof SrsEntry>;

/** The file's shape. Keys (domains, addresses) are checked and normalised after this step. */
export const DirectoryFile = z.strictObject({
  domains: z.record(z.string(), DomainEntry).nullish(),
  users: z.record(z.string(), UserEntry).nullish(),
  aliases: z.record(z.string(), AliasEntry).nullish(),
  srs: SrsEntry.nullish(),
});
export type DirectoryFile = z.infer<typeof DirectoryFile>;

/** `users["alice@example.test"].sendAs[1]`: a readable path whose keys may hold dots. */
export function formatPath(path: readonly PropertyKey[]): string {
  let out = "";
  for (const seg of path) {
    if (typeof seg === "number") out += `[${seg}]`;
    else if (typeof seg === "string" && /^[A-Za-z_][A-Za-z0-9_]*$/.test(seg)) out += out ? `.${seg}` : seg;
    else out += `[${JSON.stringify(String(seg))}]`;
  }
  return out || "(top level)";
}
