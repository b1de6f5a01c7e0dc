import { RawSmtp } from "@mailpipe/smtp-edge/testing";
import { freePort, type ServiceHandle, startService, waitFor } from "@mailpipe/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Infra, PASSWORDS, published, queueIdOf, startInfra } from "../test/harness.ts";

let infra: Infra;
const replicas: ServiceHandle[] = [];
const ports: { submission: number; submissions: number }[] = [];

const plain = (user: string, pass: string) =>
  `AUTH PLAIN ${Buffer.from(`\0${user}\0${pass}`).toString("base64")}`;
const codes = (r: { code: number; enhanced: string | undefined }) => `${r.code} ${r.enhanced}`;

async function auth(port: number, user: string, pass: string) {
  const c = await RawSmtp.connect({ port, tls: true });
  await c.command("EHLO laptop.home");
  return { c, reply: await c.command(plain(user, pass)) };
}

beforeAll(async () => {
  infra = await startInfra();
  for (let i = 0; i < 2; i++) {
    const p = { submission: await freePort(), submissions: await freePort() };
    ports.push(p);
    replicas.push(
      await startService("msa", {
        env: {
          ...infra.env,
          LOG_LEVEL: "info",
          HTTP_PORT: "",
          MSA_SUBMISSION_PORT: String(p.submission),
          MSA_SUBMISSIONS_PORT: String(p.submissions),
          AUTH_FAIL_LIMIT_USER: "3",
          AUTH_FAIL_SLOWDOWN_AFTER: "10",
          AUTH_LOCKOUT: "3s",
        },
      }),
    );
  }
});
afterAll(async () => {
  await Promise.allSettled(replicas.map((r) => r.kill()));
  await infra?.stop();
});

describe("msa as processes", () => {
  it("is ready when NATS and Redis are up, with both listeners", async () => {
    for (const r of replicas) {
      const res = await fetch(r.url("/readyz"));
      expect(res.status).toBe(200);
      expect(await res.json()).toMatchObject({
        ready: true,
        checks: { nats: true, redis: true, smtp: true },
      });
    }
  });

  it("shares brute-force counts across replicas: failures on one lock the user on the other until AUTH_LOCKOUT", async () => {
    const [a, b] = ports as [(typeof ports)[0], (typeof ports)[0]];
    const user = "erin@example.test";
    for (let i = 0; i < 3; i++) {
      const { c, reply } = await auth(a.submissions, user, `wrong-${i}`);
      expect(codes(reply)).toBe("535 5.7.8");
      c.close();
    }
    const locked = await auth(b.submissions, user, PASSWORDS[user]);
    expect(codes(locked.reply)).toBe("454 4.7.0");
    locked.c.close();
    const lockedAt = Date.now();
    // refused attempts while locked do not extend the lock; it lifts after AUTH_LOCKOUT (3 s)
    const open = await waitFor(
      async () => {
        const { c, reply } = await auth(b.submissions, user, PASSWORDS[user]);
        if (reply.code === 235) return c;
        c.close();
        expect(codes(reply)).toBe("454 4.7.0");
        return undefined;
      },
      { timeoutMs: 15_000, intervalMs: 500, message: "the lock did not lift" },
    );
    expect(Date.now() - lockedAt).toBeGreaterThanOrEqual(1500);
    expect((await open.command(`MAIL FROM:<${user}>`)).code).toBe(250);
    expect((await open.command("RCPT TO:<x@remote.test>")).code).toBe(250);
    expect((await open.command("DATA")).code).toBe(354);
    const done = await open.command(`From: ${user}\r\nSubject: after the lockout\r\n\r\nhello\r\n.`);
    expect(done.code).toBe(250);
    open.close();
    expect((await published(infra, queueIdOf(done.text))).client?.user).toBe(user);
    const lines = replicas[0]!.logs.filter((l) => l.includes('"authentication failed"'));
    expect(lines).toHaveLength(3);
    for (const l of lines) expect(JSON.parse(l)).toMatchObject({ ip: "127.0.0.1", username: user });
    expect(replicas.flatMap((r) => r.logs).join("\n")).not.toContain("wrong-");
  });

  it("exits 0 on SIGTERM", async () => {
    for (const r of replicas) expect(await r.stop("SIGTERM")).toBe(0);
  });

  it("refuses to start without a TLS certificate, saying which variable is missing", async () => {
    const svc = await startService("msa", {
      env: { ...infra.env, TLS_CERT_FILE: "", TLS_KEY_FILE: undefined },
      waitReady: false,
    });
    const exit = await svc.exited;
    expect(exit.code).toBe(78);
    const out = svc.logs.join("\n");
    expect(out).toMatch(/TLS_CERT_FILE: required/);
    expect(out).toMatch(/TLS_KEY_FILE: required/);
  });
});
