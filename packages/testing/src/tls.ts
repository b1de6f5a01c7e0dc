import { execFile } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
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

/** A certificate authority for tests: trust `cert` (PEM) on the client side, `issue()` server certificates. */
export interface TestCa {
  /** PEM certificate of the CA */
  cert: string;
  /** A certificate for `hostnames` (DNS names or IP literals) signed by this CA; `chain` adds the CA to `cert`. */
  issue(hostnames: string[], options?: { chain?: boolean; days?: number }): Promise<CertPair>;
  remove(): Promise<void>;
}

/** A throwaway CA (EC P-256, openssl CLI), so tests can check certificate verification for real. */
export async function createTestCa(name = "Mailpipe Test CA"): Promise<TestCa> {
  const dir = await tempDir("mailpipe-ca");
  const run = (args: string[]) => promisify(execFile)("openssl", args, { timeout: 30_000 });
  const caKey = path.join(dir.path, "ca.key");
  const caCert = path.join(dir.path, "ca.pem");
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await run([
    "req",
    "-x509",
    ...ec,
    "-sha256",
    "-days",
    "30",
    "-subj",
    `/CN=${name}`,
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
    "-keyout",
    caKey,
    "-out",
    caCert,
  ]);
  const cert = await readFile(caCert, "utf8");
  let serial = 0;
  return {
    cert,
    async issue(hostnames, options = {}) {
      const { names, days } = checked({ hostnames, days: options.days ?? 30 });
      const n = ++serial;
      const key = path.join(dir.path, `${n}.key`);
      const csr = path.join(dir.path, `${n}.csr`);
      const ext = path.join(dir.path, `${n}.ext`);
      const out = path.join(dir.path, `${n}.pem`);
      const san = names.map((h) => (net.isIP(h) ? `IP:${h}` : `DNS:${h}`)).join(",");
      await writeFile(
        ext,
        `subjectAltName=${san}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n`,
      );
      await run(["req", ...ec, "-subj", `/CN=${names[0]}`, "-keyout", key, "-out", csr]);
      await run([
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        caCert,
        "-CAkey",
        caKey,
        "-set_serial",
        String(1000 + n),
        "-days",
        String(days),
        "-sha256",
        "-extfile",
        ext,
        "-out",
        out,
      ]);
      const leaf = await readFile(out, "utf8");
      return { key: await readFile(key, "utf8"), cert: options.chain ? `${leaf.trimEnd()}\n${cert}` : leaf };
    },
    remove: () => dir.remove(),
  };
}
