import { RawSmtp } from "@mailpipe/smtp-edge/testing";
import nodemailer from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  expectNothingPublished,
  type Infra,
  type InProcessMsa,
  PASSWORDS,
  published,
  queueIdOf,
  startInfra,
  startInProcess,
} from "../test/harness.ts";

let infra: Infra;
let msa: InProcessMsa;

beforeAll(async () => {
  infra = await startInfra();
  msa = await startInProcess(infra, {
    RATE_MESSAGES_PER_HOUR: "2",
    RATE_RECIPIENTS_PER_MESSAGE: "3",
    AUTH_FAIL_SLOWDOWN_AFTER: "3",
    AUTH_FAIL_DELAY_STEP: "400ms",
    AUTH_FAIL_DELAY_MAX: "1s",
    AUTH_FAIL_LIMIT_USER: "5",
    AUTH_FAIL_LIMIT_IP: "8",
    AUTH_LOCKOUT: "1m",
    AUTH_LOCKED_CLOSE_AFTER: "3",
    MSA_RECEIVED_CLIENT_DETAILS: "true",
  });
});
afterAll(async () => {
  await msa?.close();
  await infra?.stop();
});

const codes = (r: { code: number; enhanced: string | undefined }) => `${r.code} ${r.enhanced}`;
const plain = (user: string, pass: string) =>
  `AUTH PLAIN ${Buffer.from(`\0${user}\0${pass}`).toString("base64")}`;

async function session(user: string, pass: string, localAddress = "127.0.0.1") {
  const c = await RawSmtp.connect({ port: msa.submissionsPort, tls: true, localAddress });
  await c.command("EHLO laptop.home");
  const auth = await c.command(plain(user, pass));
  return { c, auth };
}

/** Each barrier is a different user, so the hourly limit under test does not get in the way. */
let barriers = 0;
async function barrier(): Promise<string> {
  const user = barriers++ % 2 ? "alice@example.test" : "bob@example.test";
  const info = await nodemailer
    .createTransport({
      host: "127.0.0.1",
      port: msa.submissionPort,
      requireTLS: true,
      auth: { user, pass: PASSWORDS[user] },
      tls: { rejectUnauthorized: false },
    })
    .sendMail({ from: user, to: "x@remote.test", subject: "barrier", text: "barrier" });
  return queueIdOf(info.response);
}

describe("rate limits", () => {
  it("messages per hour: the message over the limit gets 450 4.7.1 at MAIL FROM", async () => {
    const { c, auth } = await session("erin@example.test", PASSWORDS["erin@example.test"]);
    expect(auth.code).toBe(235);
    for (let i = 0; i < 2; i++) {
      expect((await c.command("MAIL FROM:<erin@example.test>")).code).toBe(250);
      expect((await c.command("RCPT TO:<x@remote.test>")).code).toBe(250);
      expect((await c.command("DATA")).code).toBe(354);
      const r = await c.command(`From: erin@example.test\r\nSubject: ${i}\r\n\r\nbody\r\n.`);
      expect(r.code).toBe(250);
      await published(infra, queueIdOf(r.text));
    }
    await expectNothingPublished(
      infra,
      async () => {
        const r = await c.command("MAIL FROM:<erin@example.test>");
        expect(codes(r)).toBe("450 4.7.1");
        c.close();
        // the count is in Redis: a new connection is limited too
        const again = await session("erin@example.test", PASSWORDS["erin@example.test"]);
        expect(codes(await again.c.command("MAIL FROM:<erin@example.test>"))).toBe("450 4.7.1");
        again.c.close();
      },
      barrier,
    );
    expect(await msa.telemetry.metrics.text()).toMatch(
      /mailpipe_msa_rate_limited_total\{limit="messages",service="msa"\} 2/,
    );
  });

  it("recipients per message: the RCPT over the limit gets 452 4.5.3 (a repeated one does not count)", async () => {
    await expectNothingPublished(
      infra,
      async () => {
        const { c } = await session("alice@example.test", PASSWORDS["alice@example.test"]);
        expect((await c.command("MAIL FROM:<alice@example.test>")).code).toBe(250);
        for (const to of ["a@remote.test", "b@remote.test", "c@remote.test", "B@remote.test"]) {
          expect((await c.command(`RCPT TO:<${to}>`)).code, to).toBe(250);
        }
        const over = await c.command("RCPT TO:<d@remote.test>");
        expect(codes(over)).toBe("452 4.5.3");
        expect(over.text).toBe("Too many recipients for this message");
        c.close();
      },
      barrier,
    );
    expect(await msa.telemetry.metrics.text()).toMatch(
      /mailpipe_msa_rate_limited_total\{limit="recipients",service="msa"\} 1/,
    );
  });

  it("MSA_RECEIVED_CLIENT_DETAILS=true puts the client's IP and HELO in Received", async () => {
    const queueId = await barrier();
    const body = await infra.body(await published(infra, queueId));
    const received = /^Received: [\s\S]*?(?=\r\n\S)/m.exec(body)?.[0] ?? "";
    expect(received).toContain("[127.0.0.1]");
    expect(received).toContain("with ESMTPSA");
  });
});

describe("brute-force protection", () => {
  it("slows replies after 3 failures, locks the user after 5 even for the right password, and closes after 3 refusals", async () => {
    const user = "dave@example.test";
    const c = await RawSmtp.connect({ port: msa.submissionsPort, tls: true, localAddress: "127.0.0.3" });
    await c.command("EHLO attacker");
    const took: number[] = [];
    for (let i = 0; i < 5; i++) {
      const started = Date.now();
      const r = await c.command(plain(user, `guess-${i}`));
      took.push(Date.now() - started);
      expect(codes(r), `attempt ${i + 1}`).toBe("535 5.7.8");
    }
    // the 4th and 5th replies waited 400 ms and 800 ms
    expect(took[3]).toBeGreaterThanOrEqual(350);
    expect(took[4]).toBeGreaterThanOrEqual(750);
    const right = await c.command(plain(user, PASSWORDS[user]));
    expect(codes(right)).toBe("454 4.7.0");
    expect(codes(await c.command(plain(user, PASSWORDS[user])))).toBe("454 4.7.0");
    const third = await c.command(plain(user, PASSWORDS[user]));
    expect(codes(third)).toBe("421 4.7.0");
    await c.waitClosed(5000);
    // from another address too: the lock is on the user
    const other = await session(user, PASSWORDS[user], "127.0.0.4");
    expect(codes(other.auth)).toBe("454 4.7.0");
    other.c.close();
    const warned = msa.logs.filter((l) => l.msg === "authentication failed" && l.username === user);
    expect(warned.map((l) => l.ip)).toEqual(Array(5).fill("127.0.0.3"));
    expect(JSON.stringify(msa.logs)).not.toContain("guess-");
    expect(await msa.telemetry.metrics.text()).toMatch(
      /mailpipe_msa_auth_total\{result="locked",service="msa"\} 4/,
    );
  });

  it("locks an IP that tries many users, not other IPs; a good login does not reset the IP's count", async () => {
    const ip = "127.0.0.5";
    const ok = await session("bob@example.test", PASSWORDS["bob@example.test"], ip);
    expect(ok.auth.code).toBe(235);
    ok.c.close();
    for (let i = 0; i < 8; i++) {
      const { c, auth } = await session(`nobody${i}@example.test`, "x", ip);
      expect(codes(auth)).toBe("535 5.7.8");
      c.close();
    }
    const locked = await session("bob@example.test", PASSWORDS["bob@example.test"], ip);
    expect(codes(locked.auth)).toBe("454 4.7.0");
    locked.c.close();
    const elsewhere = await session("bob@example.test", PASSWORDS["bob@example.test"], "127.0.0.6");
    expect(elsewhere.auth.code).toBe(235);
    elsewhere.c.close();
  });
});

describe("when Redis is down", () => {
  it("refuses AUTH with 454 4.7.0 and MAIL with 451 4.3.0 instead of going unguarded", async () => {
    const { c, auth } = await session("alice@example.test", PASSWORDS["alice@example.test"], "127.0.0.7");
    expect(auth.code).toBe(235);
    await infra.redis.kill();
    try {
      expect(codes(await c.command("MAIL FROM:<alice@example.test>"))).toBe("451 4.3.0");
      const fresh = await session("alice@example.test", PASSWORDS["alice@example.test"], "127.0.0.7");
      expect(codes(fresh.auth)).toBe("454 4.7.0");
      fresh.c.close();
    } finally {
      c.close();
      await infra.redis.restart();
    }
  });
});
