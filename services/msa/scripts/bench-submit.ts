// Authenticated submission throughput: msa as its own process on real nats-server and
// redis-server, nodemailer pooling N authenticated connections (STARTTLS + AUTH PLAIN on the
// submission port, reused for every message), M messages of about 2 KB each.
//   node services/msa/scripts/bench-submit.ts [messages=2000] [connections=10]
import { freePort, startService } from "@mailpipe/testing";
import nodemailer from "nodemailer";
import { PASSWORDS, startInfra } from "../test/harness.ts";

const messages = Number(process.argv[2] ?? 2000);
const connections = Number(process.argv[3] ?? 10);

const infra = await startInfra();
const port = await freePort();
const msa = await startService("msa", {
  env: {
    ...infra.env,
    LOG_LEVEL: "warn",
    HTTP_PORT: "",
    MSA_SUBMISSION_PORT: String(port),
    MSA_SUBMISSIONS_PORT: String(await freePort()),
    RATE_MESSAGES_PER_HOUR: "0",
    MAX_CONNECTIONS_PER_IP: String(connections + 5),
  },
});
try {
  const transport = nodemailer.createTransport({
    pool: true,
    maxConnections: connections,
    maxMessages: Number.POSITIVE_INFINITY,
    host: "127.0.0.1",
    port,
    requireTLS: true,
    auth: { user: "alice@example.test", pass: PASSWORDS["alice@example.test"], method: "PLAIN" },
    tls: { rejectUnauthorized: false },
  });
  transport.on("error", (err) => process.stderr.write(`pool error: ${err.message}\n`));
  const text = `${"0123456789abcdef ".repeat(6)}\n`.repeat(19); // ~2 KB with the headers
  // warm up: open the pool's connections and log in
  await Promise.all(
    Array.from({ length: connections }, () =>
      transport.sendMail({ from: "alice@example.test", to: "bench@remote.test", subject: "warm-up", text }),
    ),
  );
  const started = performance.now();
  let next = 0;
  let failed = 0;
  await Promise.all(
    Array.from({ length: connections * 2 }, async () => {
      while (next < messages) {
        next++;
        await transport
          .sendMail({
            from: "Alice <alice@example.test>",
            to: "bench@remote.test",
            subject: `bench ${next}`,
            text,
          })
          .catch(() => failed++);
      }
    }),
  );
  const seconds = (performance.now() - started) / 1000;
  transport.close();
  const size = infra.queued.at(-1)?.body.size ?? 0;
  process.stdout.write(
    `${messages} messages (${size} bytes stored each, DKIM-signed) over ${connections} authenticated connections: ` +
      `${(messages / seconds).toFixed(0)} messages/s (${seconds.toFixed(2)} s, ${failed} failed)\n`,
  );
} finally {
  await msa.stop();
  await infra.stop();
}
