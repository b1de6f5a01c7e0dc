import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { RawSmtp } from "@mailpipe/smtp-edge/testing";
import { dkimVerify } from "mailauth";
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
  msa = await startInProcess(infra);
});
afterAll(async () => {
  await msa?.close();
  await infra?.stop();
});

const ALICE = { user: "alice@example.test", pass: PASSWORDS["alice@example.test"] };

function transport(opts: {
  port: number;
  secure: boolean;
  method?: "PLAIN" | "LOGIN";
  pass?: string;
  localAddress?: string;
}) {
  return nodemailer.createTransport({
    host: "127.0.0.1",
    port: opts.port,
    secure: opts.secure,
    requireTLS: !opts.secure,
    auth: { user: ALICE.user, pass: opts.pass ?? ALICE.pass, method: opts.method ?? "PLAIN" },
    tls: { rejectUnauthorized: false },
    ...(opts.localAddress ? { localAddress: opts.localAddress } : {}),
  });
}

/** A good submission from alice over 587; returns its queue ID (the barrier of the refusal tests). */
async function barrier(): Promise<string> {
  const info = await transport({ port: msa.submissionPort, secure: false }).sendMail({
    from: ALICE.user,
    to: "someone@remote.test",
    subject: "barrier",
    text: "barrier",
  });
  return queueIdOf(info.response);
}

/** EHLO, STARTTLS (on 587), EHLO and AUTH PLAIN; returns the AUTH reply. */
async function login(c: RawSmtp, user: string, pass: string, starttls = true) {
  await c.command("EHLO client.example");
  if (starttls) {
    await c.starttls();
    await c.command("EHLO client.example");
  }
  return c.command(`AUTH PLAIN ${Buffer.from(`\0${user}\0${pass}`).toString("base64")}`);
}

async function connect587(localAddress?: string) {
  return RawSmtp.connect({ port: msa.submissionPort, ...(localAddress ? { localAddress } : {}) });
}

const codes = (r: { code: number; enhanced: string | undefined }) => `${r.code} ${r.enhanced}`;

describe("submission with real clients", () => {
  it("nodemailer over 587 (STARTTLS + AUTH PLAIN): Message-ID, Date, private Received and a DKIM signature that verifies", async () => {
    const raw = [
      "From: Alice <alice@example.test>",
      "To: Bob <bob@remote.test>",
      "Subject: no Message-ID, no Date",
      "",
      "Hello Bob,",
      "this message left the client without a Message-ID or a Date.",
      "",
    ].join("\r\n");
    const info = await transport({ port: msa.submissionPort, secure: false, method: "PLAIN" }).sendMail({
      envelope: { from: ALICE.user, to: ["bob@remote.test"] },
      raw,
    });
    expect(info.response).toMatch(/^250 2\.0\.0 OK: queued as [0-9A-Z]{26}$/);
    const queueId = queueIdOf(info.response);
    const queued = await published(infra, queueId);
    expect(queued).toMatchObject({
      source: "msa",
      envelope: { mailFrom: "alice@example.test", rcptTo: [{ address: "bob@remote.test" }] },
      client: { user: "alice@example.test", tls: true, ip: "127.0.0.1" },
      messageId: `<${queueId}@mail.example.test>`,
    });
    const body = await infra.body(queued);
    const head = body.slice(0, body.indexOf("\r\n\r\n"));
    expect(head).toContain(`Message-ID: <${queueId}@mail.example.test>`);
    expect(head).toMatch(/\r\nDate: \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000\r\n/);
    const received = /^Received: [\s\S]*?(?=\r\n\S)/m.exec(head)?.[0] ?? "";
    expect(received).toContain("by mail.example.test");
    expect(received).toContain("with ESMTPSA");
    expect(received).toContain(`id ${queueId}`);
    expect(received).not.toContain("127.0.0.1");
    expect(received).not.toContain("client.example");
    expect(received).not.toContain("alice");
    expect(head).toMatch(/DKIM-Signature: [\s\S]*d=example\.test/);
    const result = await dkimVerify(Buffer.from(body), { resolver: infra.resolver });
    expect(result.results.map((r) => [r.signingDomain, r.status.result])).toEqual([["example.test", "pass"]]);
    expect(body.endsWith("this message left the client without a Message-ID or a Date.\r\n")).toBe(true);
  });

  it("nodemailer over 465 (implicit TLS + AUTH LOGIN) keeps the client's Message-ID and signs ed25519 for example.org", async () => {
    const info = await transport({ port: msa.submissionsPort, secure: true, method: "LOGIN" }).sendMail({
      from: "Alice at example.org <alice@example.org>",
      sender: ALICE.user,
      envelope: { from: "alice@example.org", to: ["carol@remote.test", "team@example.test"] },
      to: "carol@remote.test",
      subject: "from the other domain",
      text: "signed with Ed25519",
      messageId: "<client-chosen@alice.example>",
    });
    const queued = await published(infra, queueIdOf(info.response));
    expect(queued.messageId).toBe("<client-chosen@alice.example>");
    expect(queued.client).toMatchObject({ user: "alice@example.test", tls: true });
    expect(queued.envelope.rcptTo.map((r) => r.address)).toEqual(["carol@remote.test", "team@example.test"]);
    const body = await infra.body(queued);
    expect(body.match(/^Message-ID:/gim)).toHaveLength(1);
    const result = await dkimVerify(Buffer.from(body), { resolver: infra.resolver });
    expect(result.results.map((r) => [r.signingDomain, r.algo, r.format, r.status.result])).toEqual([
      ["example.org", "ed25519-sha256", "relaxed/relaxed", "pass"],
    ]);
    expect(body).toMatch(/a=ed25519-sha256/);
  });

  it("swaks submits over 587 (--tls, AUTH PLAIN) and over 465 (--tlsc, AUTH LOGIN)", async () => {
    const run = promisify(execFile);
    for (const [port, tlsFlag, auth] of [
      [msa.submissionPort, "--tls", "PLAIN"],
      [msa.submissionsPort, "--tlsc", "LOGIN"],
    ] as const) {
      const { stdout } = await run(
        "swaks",
        [
          "--server",
          `127.0.0.1:${port}`,
          tlsFlag,
          "--auth",
          auth,
          "--auth-user",
          ALICE.user,
          "--auth-password",
          ALICE.pass,
          "--from",
          ALICE.user,
          "--to",
          "dan@remote.test",
          "--header",
          `Subject: swaks ${auth}`,
        ],
        { timeout: 20_000 },
      );
      expect(stdout).toMatch(/<~\s+235 /);
      const queueId = queueIdOf(stdout);
      const queued = await published(infra, queueId);
      expect(queued.client?.user).toBe("alice@example.test");
      const result = await dkimVerify(Buffer.from(await infra.body(queued)), { resolver: infra.resolver });
      expect(result.results[0]?.status.result).toBe("pass");
    }
  });

  it("sends mail from a domain without a DKIM key unsigned, and logs that once", async () => {
    for (let i = 0; i < 2; i++) {
      const info = await transport({ port: msa.submissionPort, secure: false }).sendMail({
        from: "alice@nokey.test",
        to: "someone@remote.test",
        subject: "unsigned",
        text: "no key for nokey.test",
      });
      const body = await infra.body(await published(infra, queueIdOf(info.response)));
      expect(body).not.toContain("DKIM-Signature:");
    }
    expect(msa.logs.filter((l) => l.domain === "nokey.test" && /unsigned/.test(String(l.msg)))).toHaveLength(
      1,
    );
  });
});

describe("refusals: exact reply, nothing published", () => {
  it("AUTH before STARTTLS on 587: 530 5.7.0, for PLAIN and for LOGIN (no credentials asked)", async () => {
    await expectNothingPublished(
      infra,
      async () => {
        const c = await connect587();
        const ehlo = await c.command("EHLO client.example");
        expect(ehlo.lines.join("\n")).toContain("STARTTLS");
        const plain = await c.command(
          `AUTH PLAIN ${Buffer.from(`\0${ALICE.user}\0${ALICE.pass}`).toString("base64")}`,
        );
        expect(codes(plain)).toBe("530 5.7.0");
        const loginStep = await c.command("AUTH LOGIN");
        expect(codes(loginStep)).toBe("530 5.7.0");
        expect((await c.command("MAIL FROM:<alice@example.test>")).code).toBe(530);
        c.close();
      },
      barrier,
    );
  });

  it("MAIL before AUTH: 530 5.7.0, before and after STARTTLS", async () => {
    await expectNothingPublished(
      infra,
      async () => {
        const c = await connect587();
        await c.command("EHLO client.example");
        expect(codes(await c.command("MAIL FROM:<alice@example.test>"))).toBe("530 5.7.0");
        await c.starttls();
        await c.command("EHLO client.example");
        const r = await c.command("MAIL FROM:<alice@example.test>");
        expect(codes(r)).toBe("530 5.7.0");
        expect(r.text).toBe("Authentication required");
        expect(codes(await c.command("RCPT TO:<bob@remote.test>"))).toBe("530 5.7.0");
        c.close();
        const s = await RawSmtp.connect({ port: msa.submissionsPort, tls: true });
        await s.command("EHLO client.example");
        expect(codes(await s.command("MAIL FROM:<alice@example.test>"))).toBe("530 5.7.0");
        s.close();
      },
      barrier,
    );
  });

  it("wrong password: 535 5.7.8 (raw and through nodemailer), logged with IP and username only", async () => {
    await expectNothingPublished(
      infra,
      async () => {
        const c = await connect587("127.0.0.2");
        const r = await login(c, "bob@example.test", "not-bobs-password");
        expect(codes(r)).toBe("535 5.7.8");
        expect(codes(await c.command("MAIL FROM:<bob@example.test>"))).toBe("530 5.7.0");
        c.close();
        const err = await transport({
          port: msa.submissionsPort,
          secure: true,
          pass: "wrong",
          localAddress: "127.0.0.2",
        })
          .sendMail({ from: ALICE.user, to: "x@remote.test", text: "x" })
          .then(
            () => undefined,
            (e: { responseCode?: number; response?: string }) => e,
          );
        expect(err?.responseCode).toBe(535);
        expect(err?.response).toMatch(/^535 5\.7\.8 /);
      },
      barrier,
    );
    const failures = msa.logs.filter((l) => l.msg === "authentication failed");
    expect(failures).toEqual(
      expect.arrayContaining([expect.objectContaining({ ip: "127.0.0.2", username: "bob@example.test" })]),
    );
    expect(JSON.stringify(msa.logs)).not.toContain("not-bobs-password");
    const metrics = await msa.telemetry.metrics.text();
    expect(metrics).toMatch(/mailpipe_msa_auth_total\{result="failure",service="msa"\} [1-9]/);
    expect(metrics).toMatch(/mailpipe_msa_auth_total\{result="success",service="msa"\} [1-9]/);
  });

  it("spoofed envelope sender and the null sender: 553 5.7.1 at MAIL FROM", async () => {
    await expectNothingPublished(
      infra,
      async () => {
        const c = await connect587();
        expect((await login(c, ALICE.user, ALICE.pass)).code).toBe(235);
        const spoof = await c.command("MAIL FROM:<bob@example.test>");
        expect(codes(spoof)).toBe("553 5.7.1");
        expect(spoof.text).toBe("Sender address <bob@example.test> is not owned by you");
        expect(codes(await c.command("MAIL FROM:<ceo@bank.test>"))).toBe("553 5.7.1");
        expect(codes(await c.command("MAIL FROM:<>"))).toBe("553 5.7.1");
        // the alias alice is a member of is hers to use
        expect((await c.command("MAIL FROM:<team@example.test>")).code).toBe(250);
        c.close();
      },
      barrier,
    );
  });

  it("spoofed header From (even beside alice's own) and a missing From: refused at the end of DATA", async () => {
    const send = async (headers: string) => {
      const c = await connect587();
      await login(c, ALICE.user, ALICE.pass);
      expect((await c.command("MAIL FROM:<alice@example.test>")).code).toBe(250);
      expect((await c.command("RCPT TO:<bob@remote.test>")).code).toBe(250);
      expect((await c.command("DATA")).code).toBe(354);
      const r = await c.command(`${headers}\r\nSubject: test\r\n\r\nbody\r\n.`);
      c.close();
      return r;
    };
    await expectNothingPublished(
      infra,
      async () => {
        const spoof = await send("From: Bob <bob@example.test>");
        expect(codes(spoof)).toBe("553 5.7.1");
        expect(spoof.text).toBe("Sender address <bob@example.test> is not owned by you");
        expect(codes(await send("From: alice@example.test, ceo@bank.test"))).toBe("553 5.7.1");
        const none = await send("To: bob@remote.test");
        expect(codes(none)).toBe("550 5.6.0");
        expect(codes(await send("From: alice@example.test\r\nFrom: alice@example.test"))).toBe("550 5.6.0");
      },
      barrier,
    );
  });
});
