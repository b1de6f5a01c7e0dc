import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { promisify } from "node:util";
import { generate } from "selfsigned";
import { tempDir } from "./process.ts";

export interface SelfSignedCertOptions {
  /** DNS names or IP literals; the first is also the subject CN. */
  hostnames: string[];
  /** Validity in days from now; default 365. */
  days?: number;
}

export interface CertPair {
  /** PEM private key. */
  key: string;
  /** PEM certificate. */
  cert: string;
}

/** A self-signed RSA certificate valid for `hostnames`, for test peers and the development certificate. */
export async function createSelfSignedCert(options: SelfSignedCertOptions): Promise<CertPair> {
  try {
    return await createSelfSignedCertWithSelfsigned(options);
  } catch {
    return createSelfSignedCertWithOpenssl(options);
  }
}

function checked(options: SelfSignedCertOptions): { names: string[]; days: number } {
  const names = options.hostnames.map((n) => n.trim()).filter(Boolean);
  if (names.length === 0) throw new Error("createSelfSignedCert needs at least one hostname");
  return { names, days: options.days ?? 365 };
}

async function createSelfSignedCertWithSelfsigned(options: SelfSignedCertOptions): Promise<CertPair> {
  const { names, days } = checked(options);
  const notBeforeDate = new Date(Date.now() - 60_000); // tolerate clocks a little behind
  const notAfterDate = new Date(Date.now() + days * 86_400_000);
  const pems = await generate([{ name: "commonName", value: names[0] }], {
    keyType: "rsa",
    keySize: 2048,
    algorithm: "sha256",
    notBeforeDate,
    notAfterDate,
    extensions: [
      { name: "basicConstraints", cA: false, critical: true },
      { name: "keyUsage", digitalSignature: true, keyEncipherment: true, critical: true },
      { name: "extKeyUsage", serverAuth: true, clientAuth: true },
      {
        name: "subjectAltName",
        altNames: names.map((n) =>
          net.isIP(n) ? { type: 7 as const, ip: n } : { type: 2 as const, value: n },
        ),
      },
    ],
  });
  return { key: pems.private, cert: pems.cert };
}

/** The same certificate made by the openssl CLI; exported for its test, not from the package. */
export async function createSelfSignedCertWithOpenssl(options: SelfSignedCertOptions): Promise<CertPair> {
  const { names, days } = checked(options);
  const dir = await tempDir("mailpipe-cert");
  try {
    const keyFile = path.join(dir.path, "key.pem");
    const certFile = path.join(dir.path, "cert.pem");
    const san = names.map((n) => (net.isIP(n) ? `IP:${n}` : `DNS:${n}`)).join(",");
    await promisify(execFile)(
      "openssl",
      [
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-sha256",
        "-nodes",
        "-days",
        String(days),
        "-subj",
        `/CN=${names[0]}`,
        "-addext",
        `subjectAltName=${san}`,
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-addext",
        "extendedKeyUsage=serverAuth,clientAuth",
        "-keyout",
        keyFile,
        "-out",
        certFile,
      ],
      { timeout: 30_000 },
    );
    return { key: await readFile(keyFile, "utf8"), cert: await readFile(certFile, "utf8") };
  } finally {
    await dir.remove();
  }
}
