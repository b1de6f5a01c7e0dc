import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import type { AddressInfo } from "node:net";
import { replies, SmtpError } from "@mailpipe/contracts";
import { SMTPServer } from "smtp-server";
import { SMTPConnection } from "smtp-server/lib/smtp-connection.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RawSmtp } from "../test/raw-smtp.ts";
import { installSmtpServerPatches, leadingEnhancedCode, unpatched } from "./patches.ts";

// These tests pin the smtp-server behaviour the patches rely on. When one fails after an upgrade,
// read the new smtp-connection.js (send, _getEnhancedStatusCode, _parseAddressCommand) and adapt.

let server: SMTPServer;
let port: number;
const seenRcpts: string[] = [];

beforeAll(async () => {
  installSmtpServerPatches();
  server = new SMTPServer({
    hideENHANCEDSTATUSCODES: false,
    disabledCommands: ["AUTH", "STARTTLS"],
    hideSTARTTLS: true,
    logger: false,
    onRcptTo(address, _session, callback) {
      seenRcpts.push(address.address);
      if (address.address.endsWith("@example.test")) return callback();
      callback(new SmtpError(replies.relayDenied()));
    },
    onData(stream, _session, callback) {
      stream.resume();
      stream.on("end", () => callback(new SmtpError(replies.mailLoop())));
    },
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  port = (server.server.address() as AddressInfo).port;
});

afterAll(async () => {
  await new Promise<void>((resolve) => server.close(() => resolve()));
});

describe("smtp-server pin", () => {
  it("is the 3.21 line the patches were written against", () => {
    const require = createRequire(import.meta.url);
    const pkgFile = require.resolve("smtp-server/package.json");
    const version = JSON.parse(readFileSync(pkgFile, "utf8")).version as string;
    expect(version).toMatch(/^3\.21\./);
  });

  it("still derives 5.1.1 from 550 on its own (the behaviour the send patch corrects)", () => {
    const fake = { _server: { options: {} }, _useEnhancedStatusCodes: () => true };
    const derive = (
      SMTPConnection.prototype as unknown as {
        _getEnhancedStatusCode(this: unknown, code: number, context?: string | false): string;
      }
    )._getEnhancedStatusCode;
    expect(derive.call(fake, 550)).toBe("5.1.1");
    expect(derive.call(fake, 451)).toBe("4.3.0");
    expect(derive.call(fake, 550, false)).toBe("");
    expect(typeof unpatched.send).toBe("function");
  });

  it("still refuses a quoted local part holding @ on its own (the behaviour the parse patch corrects)", () => {
    const fake = { _server: { options: {}, logger: { error() {} } }, session: {} };
    const parse = unpatched.parseAddress!;
    expect(parse.call(fake, "rcpt to", 'RCPT TO:<"user@other.test"@example.test>')).toBe(false);
    expect(parse.call(fake, "rcpt to", "RCPT TO:<user@example.test>")).toMatchObject({
      address: "user@example.test",
    });
  });

  it("has no option that replaces a patch yet (docs/upstream/smtp-server-*.md propose them)", () => {
    const parse = unpatched.parseAddress!;
    // lenientAddressParsing relaxes local-part checks but still splits the address on every "@"
    const lenient = {
      _server: { options: { lenientAddressParsing: true }, logger: { error() {} } },
      session: {},
    };
    expect(parse.call(lenient, "rcpt to", 'RCPT TO:<"user@other.test"@example.test>')).toBe(false);
    // writing a reply emits nothing a listener could count (the send patch reports replies itself)
    const proto = SMTPConnection.prototype as unknown as Record<string, unknown>;
    const emitted: unknown[] = [];
    const fake = {
      _server: { options: { hideENHANCEDSTATUSCODES: false }, logger: { debug() {} } },
      session: {},
      _useEnhancedStatusCodes: proto._useEnhancedStatusCodes,
      _getEnhancedStatusCode: proto._getEnhancedStatusCode,
      emit: (...args: unknown[]) => emitted.push(args),
      close() {},
    };
    unpatched.send!.call(fake as unknown as SMTPConnection, 550, "5.7.1 Relay access denied");
    expect(emitted).toEqual([]);
    // and an error's own enhanced code is not a reply parameter: send takes (code, text, context)
    expect(unpatched.send!.length).toBe(3);
  });
});

describe("enhanced status code patch", () => {
  it("reads the enhanced code from the start of a reply text of the same class only", () => {
    expect(leadingEnhancedCode(550, "5.7.1 Relay access denied")).toBe("5.7.1");
    expect(leadingEnhancedCode(451, "4.3.0 Try later")).toBe("4.3.0");
    expect(leadingEnhancedCode(550, "4.3.0 wrong class")).toBeUndefined();
    expect(leadingEnhancedCode(550, "Relay access denied")).toBeUndefined();
    expect(leadingEnhancedCode(550, ["5.7.1 multi"])).toBeUndefined();
  });

  it("sends the hook's enhanced code on the wire, once, and keeps ENHANCEDSTATUSCODES advertised", async () => {
    const c = await RawSmtp.connect({ port });
    const ehlo = await c.command("EHLO client.test");
    expect(ehlo.lines.map((l) => l.slice(4))).toContain("ENHANCEDSTATUSCODES");
    expect(await c.command("MAIL FROM:<a@remote.test>")).toMatchObject({ code: 250, enhanced: "2.1.0" });
    const denied = await c.command("RCPT TO:<bob@other.test>");
    expect(denied.lines).toEqual(["550 5.7.1 Relay access denied: we accept mail only for our own domains"]);
    // smtp-server's own replies keep its derived codes
    expect(await c.command("RCPT TO:<bob@@example.test>")).toMatchObject({ code: 501, enhanced: "5.1.3" });
    expect(await c.command("RCPT TO:<bob@example.test>")).toMatchObject({ code: 250, enhanced: "2.1.5" });
    expect(await c.command("DATA")).toMatchObject({ code: 354 });
    const end = await c.command("Subject: x\r\n\r\nhi\r\n.");
    expect(end.lines).toEqual(["554 5.4.6 Too many hops: mail loop detected"]);
    c.close();
  });

  it("hands a quoted local part holding @ to the RCPT hook instead of answering 501", async () => {
    const c = await RawSmtp.connect({ port });
    await c.command("EHLO client.test");
    await c.command("MAIL FROM:<a@remote.test>");
    const r = await c.command('RCPT TO:<"user@other.test"@example.test>');
    expect(r).toMatchObject({ code: 250, enhanced: "2.1.5" });
    expect(seenRcpts).toContain('"user@other.test"@example.test');
    // the domain still gets smtp-server's checks
    expect(await c.command('RCPT TO:<"user@other.test"@exa..mple.test>')).toMatchObject({ code: 501 });
    c.close();
  });
});
