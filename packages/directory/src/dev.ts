import { createPrivateKey, createPublicKey, generateKeyPair, randomBytes } from "node:crypto";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { resolve } from "node:path";
import { hashPassword } from "./password.ts";
import type { DkimAlgorithm } from "./schema.ts";

/** A new DKIM private key as PKCS#8 PEM: RSA (2048 bits unless told) or Ed25519. */
export function generateDkimKey(algorithm: DkimAlgorithm = "rsa-sha256", opts: { bits?: number } = {}) {
  return new Promise<string>((ok, fail) => {
    const done = (err: Error | null, _pub: string, priv: string) => (err ? fail(err) : ok(priv));
    const encoding = {
      publicKeyEncoding: { type: "spki", format: "pem" },
      privateKeyEncoding: { type: "pkcs8", format: "pem" },
    } as const;
    if (algorithm === "ed25519-sha256") generateKeyPair("ed25519", encoding, done);
    else generateKeyPair("rsa", { modulusLength: opts.bits ?? 2048, ...encoding }, done);
  });
}

/**
 * The DNS TXT value publishing a DKIM key (`<selector>._domainkey.<domain>`): `v=DKIM1; k=rsa; p=…`,
 * or for Ed25519 the raw 32-byte public key (RFC 8463).
 */
export function dkimDnsRecord(privateKeyPem: string): string {
  const pub = createPublicKey(createPrivateKey(privateKeyPem));
  const der = pub.export({ type: "spki", format: "der" });
  if (pub.asymmetricKeyType === "ed25519") {
    return `v=DKIM1; k=ed25519; p=${der.subarray(der.length - 32).toString("base64")}`;
  }
  if (pub.asymmetricKeyType === "rsa") return `v=DKIM1; k=rsa; p=${der.toString("base64")}`;
  throw new Error(`a ${pub.asymmetricKeyType} key cannot sign DKIM`);
}

/**
 * YAML for local development: `example.test` with alice (password `alice-dev-password`) and bob
 * (`bob-dev-password`), postmaster → alice, team → alice and bob. With `keyDir`, the domain also signs
 * with DKIM: an RSA key `example.test.mail.pem` there (kept when it exists, else generated) and its DNS
 * record in `example.test.mail.dns.txt`.
 */
export async function developmentDirectory(opts: { keyDir?: string } = {}): Promise<string> {
  const [alice, bob] = await Promise.all([
    hashPassword("alice-dev-password"),
    hashPassword("bob-dev-password"),
  ]);
  let dkim = "";
  let srs = "";
  if (opts.keyDir !== undefined) {
    await mkdir(opts.keyDir, { recursive: true });
    const keyFile = resolve(opts.keyDir, "example.test.mail.pem");
    let pem = await readFile(keyFile, "utf8").catch(() => undefined);
    if (pem === undefined) {
      pem = await generateDkimKey("rsa-sha256");
      await writeFile(keyFile, pem, { mode: 0o600 });
    }
    await writeFile(
      resolve(opts.keyDir, "example.test.mail.dns.txt"),
      `mail._domainkey.example.test. IN TXT "${dkimDnsRecord(pem)}"\n`,
    );
    dkim = [
      "    dkim:",
      "      selector: mail",
      "      algorithm: rsa-sha256",
      `      privateKeyFile: ${JSON.stringify(keyFile)}`,
      "",
    ].join("\n");
    // SRS for mail the aliases forward elsewhere: a secret made once, kept beside the DKIM key
    const srsFile = resolve(opts.keyDir, "srs.secret");
    if ((await readFile(srsFile, "utf8").catch(() => undefined)) === undefined) {
      await writeFile(srsFile, `${randomBytes(24).toString("hex")}\n`, { mode: 0o600 });
    }
    srs = `srs:\n  secretFile: ${JSON.stringify(srsFile)}\n`;
  }
  return `# Mailpipe directory for DEVELOPMENT ONLY.
# The passwords below are published in the source code (alice-dev-password, bob-dev-password):
# never use this file for a real deployment. Format: packages/directory/README.md.
domains:
  example.test:
${dkim}    enforceDmarc: true
    spfRejectAtMailFrom: false
users:
  alice@example.test:
    password: "${alice}"
  bob@example.test:
    password: "${bob}"
aliases:
  postmaster@example.test: [alice@example.test]
  team@example.test: [alice@example.test, bob@example.test]
${srs}`;
}
