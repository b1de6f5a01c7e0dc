import { mkdir, writeFile } from "node:fs/promises";
import { dirname, join, relative } from "node:path";
import { normalizeDomain } from "@mailpipe/contracts";
import { type DkimAlgorithm, dkimDnsRecord, generateDkimKey, setDkim } from "@mailpipe/directory";
import { CommandError, type Io, out, UsageError } from "./io.ts";

/** TXT values longer than 255 bytes go out as several quoted strings in one record. */
function zoneValue(value: string): string {
  const parts: string[] = [];
  for (let i = 0; i < value.length; i += 250) parts.push(`"${value.slice(i, i + 250)}"`);
  return parts.join(" ");
}

/** `mailctl dkim keygen <domain> [--selector s] [--algorithm rsa-sha256|ed25519-sha256] [--bits 2048]` */
export async function dkimCommand(
  args: string[],
  flags: { selector?: string; algorithm?: string; bits?: string },
  io: Io,
  directoryFile: string,
): Promise<void> {
  const [action, domainArg] = args;
  if (action !== "keygen" || !domainArg) {
    throw new UsageError(
      "usage: mailctl dkim keygen <domain> [--selector mail] [--algorithm rsa-sha256|ed25519-sha256]",
    );
  }
  const domain = normalizeDomain(domainArg);
  if (!domain) throw new CommandError(`"${domainArg}" is not a domain name`);
  const selector = flags.selector ?? "mail";
  if (!/^[a-z0-9][a-z0-9-]{0,62}$/i.test(selector))
    throw new CommandError(`"${selector}" is not a valid selector`);
  const algorithm = (flags.algorithm ?? "rsa-sha256") as DkimAlgorithm;
  if (algorithm !== "rsa-sha256" && algorithm !== "ed25519-sha256") {
    throw new CommandError(`unknown algorithm "${flags.algorithm}": use rsa-sha256 or ed25519-sha256`);
  }
  const bits = Number(flags.bits ?? 2048);
  const pem = await generateDkimKey(algorithm, { bits });
  const keyDir = join(dirname(directoryFile), "keys");
  await mkdir(keyDir, { recursive: true });
  const keyFile = join(keyDir, `${domain}.${selector}.pem`);
  await writeFile(keyFile, pem, { mode: 0o600, flag: "wx" }).catch((err: NodeJS.ErrnoException) => {
    if (err.code === "EEXIST") {
      throw new CommandError(`${keyFile} exists: pick another --selector to rotate keys`);
    }
    throw err;
  });
  await setDkim(directoryFile, domain, {
    selector,
    algorithm,
    privateKeyFile: relative(dirname(directoryFile), keyFile),
  });
  out(io, `DKIM key for ${domain} written to ${keyFile} and set in ${directoryFile}.`);
  out(io, "Publish this DNS record, then send a test message:");
  out(io);
  out(io, `${selector}._domainkey.${domain}. 3600 IN TXT ${zoneValue(dkimDnsRecord(pem))}`);
}
