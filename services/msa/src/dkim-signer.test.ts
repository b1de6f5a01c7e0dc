import { Writable } from "node:stream";
import { dkimDnsRecord, generateDkimKey } from "@mailpipe/directory";
import { createResolver, mailauthResolver } from "@mailpipe/dns";
import { createLogger, Metrics } from "@mailpipe/telemetry";
import { type DnsServerHandle, startDnsServer } from "@mailpipe/testing";
import { type DNSResolver, dkimVerify } from "mailauth";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DkimSignError, DkimSigner } from "./dkim-signer.ts";

let dns: DnsServerHandle;
let rsa: string;
let ed: string;

beforeAll(async () => {
  [rsa, ed] = await Promise.all([generateDkimKey("rsa-sha256"), generateDkimKey("ed25519-sha256")]);
  dns = await startDnsServer({
    records: {
      "mail._domainkey.example.test": { TXT: [dkimDnsRecord(rsa)] },
      "ed._domainkey.example.org": { TXT: [dkimDnsRecord(ed)] },
    },
  });
});
afterAll(() => dns?.stop());

function setup() {
  const lines: Record<string, unknown>[] = [];
  const destination = new Writable({
    write(chunk, _e, cb) {
      for (const l of String(chunk).split("\n")) if (l) lines.push(JSON.parse(l));
      cb();
    },
  });
  const metrics = new Metrics("msa", { defaults: false });
  const signer = new DkimSigner({ log: createLogger({ service: "msa", destination }), metrics });
  return { signer, lines, metrics };
}

const message = (from: string) => [
  Buffer.from("Message-ID: <q@mail.example.test>\r\nDate: Thu, 02 Jan 2025 03:04:05 +0000\r\n"),
  Buffer.from(`From: ${from}\r\nTo: bob@remote.test\r\nSubject: hi\r\n\r\n`),
  Buffer.from("Hello,\r\n\r\nthis is the body.\r\n"),
];

async function verify(signature: string, parts: Buffer[]) {
  const resolver = mailauthResolver(createResolver({ servers: [dns.address] })) as DNSResolver;
  return dkimVerify(Buffer.concat([Buffer.from(signature), ...parts]), { resolver });
}

describe("DkimSigner", () => {
  it("signs relaxed/relaxed rsa-sha256, covering Message-ID and Date, and mailauth verifies it", async () => {
    const { signer, metrics } = setup();
    const parts = message("Alice <alice@example.test>");
    const sig = await signer.sign(
      "example.test",
      { selector: "mail", algorithm: "rsa-sha256", privateKey: rsa },
      parts,
    );
    expect(sig).toMatch(/^DKIM-Signature: /);
    expect(sig).toMatch(/a=rsa-sha256/);
    expect(sig).toMatch(/c=relaxed\/relaxed/);
    expect(sig).toMatch(/d=example\.test/);
    const h = /h=([^;]+);/.exec(sig.replace(/\s+/g, ""))?.[1]?.toLowerCase().split(":") ?? [];
    expect(h).toEqual(expect.arrayContaining(["from", "date", "message-id", "subject", "to"]));
    const result = await verify(sig, parts);
    expect(result.results[0]?.status.result).toBe("pass");
    // a changed body does not pass (mailauth says neutral: body hash did not verify)
    const tampered = [...parts.slice(0, 2), Buffer.from("Hello,\r\n\r\nthis is another body.\r\n")];
    expect((await verify(sig, tampered)).results[0]?.status.result).not.toBe("pass");
    expect(await metrics.text()).toContain('mailpipe_msa_dkim_signed_total{result="signed",service="msa"} 1');
  });

  it("signs ed25519-sha256 with an Ed25519 key", async () => {
    const { signer } = setup();
    const parts = message("news@example.org");
    const sig = await signer.sign(
      "example.org",
      { selector: "ed", algorithm: "ed25519-sha256", privateKey: ed },
      parts,
    );
    expect(sig).toMatch(/a=ed25519-sha256/);
    expect((await verify(sig, parts)).results[0]?.status.result).toBe("pass");
  });

  it("sends unsigned without a key, and says so once per domain", async () => {
    const { signer, lines, metrics } = setup();
    expect(await signer.sign("nokey.test", undefined, message("a@nokey.test"))).toBe("");
    expect(await signer.sign("nokey.test", undefined, message("a@nokey.test"))).toBe("");
    expect(lines.filter((l) => l.domain === "nokey.test" && l.level === "info")).toHaveLength(1);
    expect(await metrics.text()).toContain(
      'mailpipe_msa_dkim_signed_total{result="unsigned",service="msa"} 2',
    );
  });

  it("fails loudly when a configured key cannot sign", async () => {
    const { signer } = setup();
    await expect(
      signer.sign(
        "example.test",
        { selector: "bad selector;", algorithm: "rsa-sha256", privateKey: rsa },
        message("a@example.test"),
      ),
    ).rejects.toBeInstanceOf(DkimSignError);
  });
});
