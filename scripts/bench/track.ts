// `npm run bench -- track [--messages 200000] [--events-per-message 5] [--lookups 3]`
//
// How fast `mailctl track` answers at volume. A private nats-server gets MAIL_EVENTS filled the way
// the pipeline fills it: per message `--events-per-message` events (received, queued, routed,
// attempt, delivered) on their per-message subjects, and the tracking index entries acceptance
// writes (Message-ID, sender, recipient). Then the real `mailctl track` command runs as its own
// process for a queue id, a Message-ID and an address of messages in the middle of the stream, and
// each lookup's wall time and peak RSS (GNU time) are printed, with `--scan` for one of them to
// compare. Bounded by --messages; the nats-server started here is stopped by PID.
import { execFile } from "node:child_process";
import { join } from "node:path";
import { parseArgs, promisify } from "node:util";
import { Bus } from "@mailpipe/bus";
import { newQueueId, topology } from "@mailpipe/contracts";
import { createTelemetry } from "@mailpipe/telemetry";
import { repoRoot, startNats } from "@mailpipe/testing";
import { eventsOfMessage, indexedQueueIds } from "../../packages/mailctl/src/track.ts";

const exec = promisify(execFile);
const { values } = parseArgs({
  options: {
    messages: { type: "string", default: "200000" },
    "events-per-message": { type: "string", default: "5" },
    lookups: { type: "string", default: "3" },
    help: { type: "boolean", default: false },
  },
});
if (values.help) {
  console.log("usage: npm run bench -- track [--messages 200000] [--events-per-message 5] [--lookups 3]");
  process.exit(0);
}
const MESSAGES = Number(values.messages);
const PER = Math.min(5, Math.max(2, Number(values["events-per-message"])));
const LOOKUPS = Number(values.lookups);

const nats = await startNats();
const telemetry = createTelemetry({ service: "mx", logLevel: "warn", defaultMetrics: false });
const bus = await Bus.connect({ url: nats.url, name: "bench-track", telemetry });
try {
  await bus.ensureTopology();
  const started = performance.now();
  const picks: { queueId: string; messageId: string; address: string }[] = [];
  for (let i = 0; i < MESSAGES; i++) {
    const queueId = newQueueId();
    const messageId = `<${queueId.toLowerCase()}.${i}@sender${i % 1000}.test>`;
    const from = `user${i % 5000}@sender${i % 1000}.test`;
    const to = `rcpt${i}@example.test`;
    const traceId = (i.toString(16) + "0".repeat(32)).slice(0, 32);
    bus.emit({
      type: "received",
      queueId,
      traceId,
      messageId,
      mailFrom: from,
      recipients: [to],
      size: 2048,
      client: { ip: "192.0.2.10", helo: `mx${i % 1000}.sender.test` },
    });
    bus.emit({ type: "queued", queueId, traceId, recipients: [to], size: 2048 });
    if (PER > 2) bus.emit({ type: "routed", queueId, traceId, recipients: [to], detail: "local delivery" });
    if (PER > 3) bus.emit({ type: "attempt", queueId, traceId, recipients: [to], attempt: 1 });
    if (PER > 4)
      bus.emit({
        type: "delivered",
        queueId,
        traceId,
        recipient: to,
        reply: { code: 250, enhanced: "2.0.0", text: "delivered to Maildir" },
      });
    bus.index(queueId, { messageId, addresses: [from, to] });
    if (i === Math.floor(MESSAGES / 2) + picks.length * 7) picks.push({ queueId, messageId, address: to });
    // bounded client buffers: let the server take each slice before the next
    if (i % 2000 === 1999) await bus.nc.flush();
  }
  await bus.nc.flush();
  const info = await bus.jsm.streams.info(topology.streams.events.name);
  const fillSeconds = (performance.now() - started) / 1000;
  console.log(
    `MAIL_EVENTS: ${info.state.messages} messages (${MESSAGES} messages × ${PER} events + their index entries), ${(info.state.bytes / 1e6).toFixed(0)} MB, filled in ${fillSeconds.toFixed(1)} s`,
  );
  const main = join(repoRoot, "packages", "mailctl", "src", "main.ts");
  const lookup = async (label: string, args: string[]) => {
    const { stdout, stderr } = await exec(
      "/usr/bin/time",
      ["-f", "TIME %e %M", process.execPath, main, "track", ...args, "--json"],
      { env: { ...process.env, NATS_URL: nats.url }, maxBuffer: 64 * 1024 * 1024 },
    );
    const m = /TIME ([\d.]+) (\d+)/.exec(stderr);
    const found = (JSON.parse(stdout) as { queueId: string; events: unknown[] }[]).map(
      (t) => `${t.queueId} (${t.events.length} events)`,
    );
    console.log(
      `  ${label.padEnd(34)} ${m ? `${Number(m[1]).toFixed(2)} s, ${(Number(m[2]) / 1024).toFixed(0)} MB RSS` : stderr.trim()}  → ${found.join(", ")}`,
    );
  };
  console.log("mailctl track (a new process each, as an operator runs it):");
  for (const p of picks.slice(0, LOOKUPS)) {
    await lookup(`queue id ${p.queueId}`, [p.queueId]);
    await lookup(`Message-ID ${p.messageId.slice(0, 20)}…`, [p.messageId]);
    await lookup(`address ${p.address}`, [p.address]);
  }
  // the same lookups inside one process: what the NATS reads take, without node's start-up
  console.log("the same lookups in this process (NATS reads only; messages read):");
  const since = new Date(Date.now() - 24 * 3_600_000);
  for (const p of picks.slice(0, LOOKUPS)) {
    for (const [label, fn] of [
      ["queue id", (s: { read: number }) => eventsOfMessage(bus.nc, p.queueId, s)],
      [
        "Message-ID",
        async (s: { read: number }) => {
          const ids = await indexedQueueIds(bus.nc, { kind: "messageId", value: p.messageId }, since, s);
          return Promise.all(ids.map((id) => eventsOfMessage(bus.nc, id, s)));
        },
      ],
      [
        "address",
        async (s: { read: number }) => {
          const ids = await indexedQueueIds(bus.nc, { kind: "recipient", value: p.address }, since, s);
          return Promise.all(ids.map((id) => eventsOfMessage(bus.nc, id, s)));
        },
      ],
    ] as const) {
      const stats = { read: 0 };
      const t0 = performance.now();
      await fn(stats);
      console.log(
        `  ${label.padEnd(12)} ${(performance.now() - t0).toFixed(0)} ms, ${stats.read} messages read`,
      );
    }
  }
  const p = picks[0]!;
  await lookup("address, --scan (every event read)", [p.address, "--scan"]);
} finally {
  await bus.close();
  await nats.stop();
}
