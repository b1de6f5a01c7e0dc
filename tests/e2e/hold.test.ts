// Hold and release, end to end: `mailctl queue hold --destination` keeps new mail to that
// destination (and its retries) from being dispatched, through a router restart; `release` lets it
// go, and it arrives. A message hold covers one queue id.
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { repoRoot, type SmtpPeer, startSmtpPeer, waitFor } from "@mailpipe/testing";
import nodemailer, { type TransportOptions } from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Pipeline, startPipeline } from "./harness.ts";

const exec = promisify(execFile);
let p: Pipeline;
let peer: SmtpPeer;

const mailctl = (...args: string[]) =>
  exec("node", [join(repoRoot, "packages/mailctl/src/main.ts"), ...args], {
    env: { ...process.env, REDIS_URL: p.redis.url, NATS_URL: p.nats.url },
  });

function send(to: string, subject: string) {
  return nodemailer
    .createTransport({
      host: "127.0.0.1",
      port: p.ports.submission,
      secure: false,
      requireTLS: true,
      tls: { rejectUnauthorized: false },
      auth: { user: "alice@example.test", pass: "alice-dev-password" },
    } as TransportOptions)
    .sendMail({
      envelope: { from: "alice@example.test", to: [to] },
      raw: `From: alice@example.test\r\nTo: ${to}\r\nSubject: ${subject}\r\n\r\n${subject}\r\n`,
    });
}

beforeAll(async () => {
  p = await startPipeline({
    services: ["mda", "router", "delivery", "msa"],
    dns: {
      "remote.test": { MX: [{ exchange: "mx.remote.test", priority: 10 }] },
      "mx.remote.test": { A: ["127.0.0.2"] },
    },
    env: { DSN_BATCH_DELAY: "200ms" },
  });
  peer = await startSmtpPeer({ host: "127.0.0.2", port: p.ports.remoteSmtp, name: "mx.remote.test" });
}, 120_000);

afterAll(async () => {
  await peer?.stop();
  await p?.stop();
});

describe("mailctl queue hold and release", () => {
  it("keeps mail to a held destination aside across a router restart, and sends it when released", async () => {
    const held = await mailctl("queue", "hold", "--destination", "remote.test");
    expect(held.stdout).toMatch(/on hold: mail to remote\.test/);
    // the router reads holds once a second
    await new Promise((r) => setTimeout(r, 1500));
    await send("friend@remote.test", "kept aside");
    const listed = await waitFor(
      async () => {
        const { stdout } = await mailctl("queue");
        return stdout.includes("friend@remote.test") && stdout.includes("HELD") ? stdout : false;
      },
      { timeoutMs: 20_000, message: "the held message never showed in mailctl queue" },
    );
    expect(listed).toMatch(/on hold: mail to remote\.test/);
    const { stdout: tracked } = await mailctl("track", "friend@remote.test");
    expect(tracked).toMatch(/ held +friend@remote\.test/);

    // a restarted router keeps it held
    await p.services.get("router")!.stop("SIGTERM", 15_000);
    p.services.delete("router");
    await p.start("router");
    await new Promise((r) => setTimeout(r, 3000));
    expect(peer.messages).toHaveLength(0);

    const released = await mailctl("queue", "release", "--destination", "remote.test");
    expect(released.stdout).toMatch(/released: mail to remote\.test \(1 held retry back in the schedule\)/);
    const [got] = await peer.waitForMessages(1, 30_000);
    expect(got!.raw.toString()).toContain("Subject: kept aside");
    expect((await mailctl("queue")).stdout).not.toContain("HELD");
  });

  it("refuses a hold that names nothing, or two things, with its usage", async () => {
    await expect(mailctl("queue", "hold")).rejects.toMatchObject({
      stderr: expect.stringMatching(/usage: mailctl queue hold/),
    });
    await expect(mailctl("queue", "hold", "--all", "--destination", "x.test")).rejects.toMatchObject({
      stderr: expect.stringMatching(/usage/),
    });
    await expect(mailctl("queue", "release", "not-a-queue-id")).rejects.toMatchObject({
      stderr: expect.stringMatching(/is not a queue id/),
    });
  });
});
