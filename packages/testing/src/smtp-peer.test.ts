import net from "node:net";
import nodemailer from "nodemailer";
import { afterEach, describe, expect, it } from "vitest";
import {
  type PeerContext,
  type SmtpPeer,
  type StartSmtpPeerOptions,
  sequence,
  startSmtpPeer,
} from "./smtp-peer.ts";

// Dot-stuffing, 8-bit bytes and a line without a final newline before the CRLF the client adds.
const RAW =
  "From: alice@origin.test\r\nTo: bob@dest.test\r\nSubject: peer test\r\nMIME-Version: 1.0\r\n" +
  "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" +
  ".a line starting with a dot\r\n..two dots\r\nGrüße\r\n";

const peers: SmtpPeer[] = [];

async function peer(options: StartSmtpPeerOptions = {}): Promise<SmtpPeer> {
  const p = await startSmtpPeer(options);
  peers.push(p);
  return p;
}

afterEach(async () => {
  await Promise.all(peers.splice(0).map((p) => p.stop()));
});

function transport(p: SmtpPeer, extra: Record<string, unknown> = {}) {
  return nodemailer.createTransport({
    host: p.host,
    port: p.port,
    secure: false,
    ignoreTLS: true,
    tls: { rejectUnauthorized: false },
    connectionTimeout: 2_000,
    greetingTimeout: 2_000,
    socketTimeout: 2_000,
    ...extra,
  });
}

function send(p: SmtpPeer, to: string[] = ["bob@dest.test"], extra: Record<string, unknown> = {}) {
  return transport(p, extra).sendMail({ envelope: { from: "alice@origin.test", to }, raw: RAW });
}

describe("startSmtpPeer", () => {
  it("accepts a message and records its envelope and exact bytes", async () => {
    const p = await peer();
    const info = await send(p, ["bob@dest.test", "carol@dest.test"]);
    expect(info.response).toMatch(/^250 /);
    const [message] = await p.waitForMessages(1, 2_000);
    expect(message).toMatchObject({
      mailFrom: "alice@origin.test",
      rcptTo: ["bob@dest.test", "carol@dest.test"],
      tls: false,
      remoteAddress: "127.0.0.1",
    });
    expect(message!.raw.equals(Buffer.from(RAW))).toBe(true);
    expect(message!.helo).toBeTruthy();
    expect(p.connections).toBe(1);
    expect(p.transactions).toBe(1);
  });

  it("defers DATA twice with 451, then accepts (sequence)", async () => {
    const p = await peer({
      script: { data: sequence({ reply: 451, text: "4.7.1 try later" }, { reply: 451 }, "accept") },
    });
    await expect(send(p)).rejects.toMatchObject({ responseCode: 451, response: "451 4.7.1 try later" });
    await expect(send(p)).rejects.toMatchObject({ responseCode: 451 });
    expect(p.messages).toHaveLength(0);
    await send(p);
    await send(p); // the last step repeats
    expect(p.messages.map((m) => m.transaction)).toEqual([2, 3]);
  });

  it("rejects a recipient with 550 at RCPT and keeps the others", async () => {
    const p = await peer({
      script: {
        rcpt: (ctx) =>
          ctx.recipient === "nobody@dest.test" ? { reply: 550, text: "5.1.1 No such user" } : "accept",
      },
    });
    await expect(send(p, ["nobody@dest.test"])).rejects.toMatchObject({ responseCode: 550 });
    const info = await send(p, ["bob@dest.test", "nobody@dest.test"]);
    expect(info.rejected).toEqual(["nobody@dest.test"]);
    expect(info.rejectedErrors?.[0]?.response).toBe("550 5.1.1 No such user");
    expect(p.messages.map((m) => m.rcptTo)).toEqual([["bob@dest.test"]]);
  });

  it("rejects at MAIL and at connect", async () => {
    const p = await peer({ script: { mail: { reply: 553, text: "5.7.1 Sender refused" } } });
    await expect(send(p)).rejects.toMatchObject({ responseCode: 553 });
    p.setScript({ connect: { reply: 554, text: "5.7.1 Go away" } });
    await expect(send(p)).rejects.toMatchObject({ responseCode: 554 });
    expect(p.messages).toHaveLength(0);
  });

  it("hangs at DATA so the client times out, and still stops at once", async () => {
    const p = await peer({ script: { data: { hang: true } } });
    const started = Date.now();
    await expect(send(p, undefined, { socketTimeout: 500 })).rejects.toMatchObject({ code: "ETIMEDOUT" });
    expect(Date.now() - started).toBeGreaterThanOrEqual(450);
    expect(p.messages).toHaveLength(0);

    // a session hung at connect is open while stop() runs
    p.setScript({ connect: { hang: true } });
    const socket = net.connect({ host: p.host, port: p.port });
    await new Promise((resolve) => socket.once("connect", resolve));
    const closed = new Promise((resolve) => socket.once("close", resolve));
    socket.on("error", () => undefined);
    const stopping = Date.now();
    await p.stop();
    await closed;
    expect(Date.now() - stopping).toBeLessThan(1_000);
  });

  it("counts the sessions in a transaction at once, and the connections open at once", async () => {
    const p = await peer({ script: { data: { delayMs: 300 } } });
    await Promise.all([send(p), send(p), send(p)]);
    expect(p.maxActiveTransactions).toBe(3);
    expect(p.maxOpenConnections).toBe(3);
    expect(p.activeTransactions).toBe(0);
    // one after the other on one kept connection: never more than one at once
    const one = await peer();
    const t = transport(one, { pool: true, maxConnections: 1 });
    for (let i = 0; i < 3; i++) {
      await t.sendMail({ envelope: { from: "alice@origin.test", to: ["bob@dest.test"] }, raw: RAW });
    }
    t.close();
    expect(one.maxActiveTransactions).toBe(1);
    expect(one.maxOpenConnections).toBe(1);
    expect(one.messages).toHaveLength(3);
  });

  it("delays a reply and then applies the next action", async () => {
    const p = await peer({
      script: { rcpt: { delayMs: 300, next: { reply: 452, text: "4.2.2 Mailbox full" } } },
    });
    const started = Date.now();
    await expect(send(p)).rejects.toMatchObject({ responseCode: 452 });
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
  });

  it("scripts EHLO; a refused EHLO sends the client to HELO", async () => {
    const seen: PeerContext[] = [];
    const p = await peer({
      script: {
        ehlo: (ctx) => {
          seen.push(ctx);
          return ctx.command === "EHLO" ? { reply: 502, text: "5.5.1 EHLO not here" } : "accept";
        },
      },
    });
    await send(p, undefined, { name: "client.test" });
    expect(seen.map((c) => [c.command, c.helo])).toEqual([
      ["EHLO", "client.test"],
      ["HELO", "client.test"],
    ]);
    expect(p.messages[0]?.helo).toBe("client.test");
  });

  it("offers STARTTLS and records that the message came over TLS", async () => {
    const p = await peer({ starttls: true, name: "mx.dest.test" });
    expect(p.cert).toMatch(/BEGIN CERTIFICATE/);
    await send(p, undefined, { ignoreTLS: false, requireTLS: true });
    expect(p.messages[0]?.tls).toBe(true);
    // without starttls the command is not offered, so requireTLS fails
    const plain = await peer();
    await expect(send(plain, undefined, { ignoreTLS: false, requireTLS: true })).rejects.toThrow(/STARTTLS/);
  });

  it("listens on another loopback address such as 127.0.0.2", async () => {
    const p = await peer({ host: "127.0.0.2" });
    expect(p.host).toBe("127.0.0.2");
    await send(p);
    expect(p.messages).toHaveLength(1);
    // nothing listens on 127.0.0.1 at that port
    const refused = await new Promise<string | undefined>((resolve) => {
      const socket = net.connect({ host: "127.0.0.1", port: p.port });
      socket.once("connect", () => {
        socket.destroy();
        resolve(undefined);
      });
      socket.once("error", (err: NodeJS.ErrnoException) => resolve(err.code));
    });
    expect(refused).toBe("ECONNREFUSED");
  });

  it("refuses messages over its SIZE with 552", async () => {
    const p = await peer({ size: 100 });
    await expect(send(p)).rejects.toMatchObject({ responseCode: 552 });
    expect(p.messages).toHaveLength(0);
  });

  it("passes the message to the data step and counts transactions per peer", async () => {
    const bodies: string[] = [];
    const p = await peer({
      script: {
        data: (ctx) => {
          bodies.push(ctx.message?.toString() ?? "");
          return ctx.transaction === 0 ? { reply: 250, text: "2.0.0 Ok: queued as ABC123" } : { reply: 554 };
        },
      },
    });
    const info = await send(p);
    expect(info.response).toBe("250 2.0.0 Ok: queued as ABC123");
    await expect(send(p)).rejects.toMatchObject({ responseCode: 554 });
    expect(bodies).toEqual([RAW, RAW]);
  });

  it("waitForMessages fails with a clear error when too few arrive", async () => {
    const p = await peer();
    await expect(p.waitForMessages(1, 200)).rejects.toThrow(/got 0 of 1 messages/);
  });
});
