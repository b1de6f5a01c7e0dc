import { parseArgs } from "node:util";
import { CommandError, type Io, UsageError } from "./io.ts";

// each command loads its own modules when it runs: `mailctl track` starts without the directory,
// Redis or DKIM code (an operator's lookup answers sooner and in less memory)
const dkimCommand = async (...a: Parameters<typeof import("./dkim.ts").dkimCommand>) =>
  (await import("./dkim.ts")).dkimCommand(...a);
const queueCommand = async (...a: Parameters<typeof import("./queue.ts").queueCommand>) =>
  (await import("./queue.ts")).queueCommand(...a);
const trackCommand = async (...a: Parameters<typeof import("./track.ts").trackCommand>) =>
  (await import("./track.ts")).trackCommand(...a);
const userCommand = async (...a: Parameters<typeof import("./user.ts").userCommand>) =>
  (await import("./user.ts")).userCommand(...a);
const tlsCommand = async (...a: Parameters<typeof import("./tls.ts").tlsCommand>) =>
  (await import("./tls.ts")).tlsCommand(...a);
const connect = async (...a: Parameters<typeof import("@nats-io/transport-node").connect>) =>
  (await import("@nats-io/transport-node")).connect(...a);

export const USAGE = `mailctl: operate a mailpipe installation

  mailctl user add <address> [--quota 1G]   add a user (password from the terminal, or the first line of stdin)
  mailctl user passwd <address>             change a user's password
  mailctl user del <address>                remove a user
  mailctl user list                         list users
  mailctl dkim keygen <domain> [--selector mail] [--algorithm rsa-sha256|ed25519-sha256] [--bits 2048]
                                            create a DKIM key, set it in the directory, print the DNS record
  mailctl queue [list] [--json]             scheduled retries: recipient, destination, attempts, next attempt, last reply
  mailctl queue flush                       make every scheduled retry due now
  mailctl queue hold <queue id> | --destination <domain> | --all
                                            keep mail aside (not dispatched) until released; survives restarts
  mailctl queue release <queue id> | --destination <domain> | --all
                                            end a hold: the held mail goes back to the schedule
  mailctl queue delete <id> [--bounce|--drop]
                                            remove a scheduled retry, sending a bounce (default) or not
  mailctl track <queue id | <Message-ID> | address> [--since 24h] [--json] [--scan]
                                            the message's timeline across every service, with its trace id
                                            (--scan reads every event in the window: events from before the index)
  mailctl tls <domain> [--json]             the MTA-STS policy delivery cached for the domain, and its
                                            TLS results (sessions ok, failures by type) of the last 7 days

Environment: DIRECTORY_FILE (/etc/mailpipe/directory.yaml), NATS_URL (nats://127.0.0.1:4222),
REDIS_URL (redis://127.0.0.1:6379), REDIS_SENTINELS / REDIS_SENTINEL_NAME (mymaster) /
REDIS_SENTINEL_PASSWORD (the master through Sentinels, as the services find it),
TRACE_VIEW_URL (e.g. http://localhost:16686/trace/{traceId}).
`;

function duration(v: string): number {
  const m = /^(\d+)\s*(s|m|h|d)$/.exec(v.trim());
  if (!m) throw new UsageError(`"${v}" is not a duration like 30m, 24h or 7d`);
  return Number(m[1]) * { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as "s" | "m" | "h" | "d"];
}

/** Runs one mailctl command; returns the exit code (0 ok, 1 failed, 2 usage). */
export async function run(argv: string[], io: Io): Promise<number> {
  let parsed: ReturnType<typeof parse>;
  function parse() {
    return parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        quota: { type: "string" },
        selector: { type: "string" },
        algorithm: { type: "string" },
        bits: { type: "string" },
        since: { type: "string" },
        json: { type: "boolean" },
        scan: { type: "boolean" },
        destination: { type: "string" },
        all: { type: "boolean" },
        bounce: { type: "boolean" },
        drop: { type: "boolean" },
        limit: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  }
  try {
    parsed = parse();
  } catch (err) {
    io.stderr.write(`mailctl: ${(err as Error).message}\n\n${USAGE}`);
    return 2;
  }
  const { values: flags, positionals } = parsed;
  const [command, ...rest] = positionals;
  if (flags.help || !command) {
    io.stdout.write(USAGE);
    return command || flags.help ? 0 : 2;
  }
  const env = io.env;
  const directoryFile = env.DIRECTORY_FILE ?? "/etc/mailpipe/directory.yaml";
  try {
    switch (command) {
      case "user":
        await userCommand(
          rest,
          { ...(flags.quota !== undefined ? { quota: flags.quota } : {}) },
          io,
          directoryFile,
        );
        return 0;
      case "dkim":
        await dkimCommand(rest, flags, io, directoryFile);
        return 0;
      case "queue":
        await queueCommand(rest, flags, io);
        return 0;
      case "tls":
        await tlsCommand(rest, flags, io);
        return 0;
      case "track": {
        if (!rest[0]) throw new UsageError("usage: mailctl track <queue id | <Message-ID> | address>");
        const url = env.NATS_URL ?? "nats://127.0.0.1:4222";
        const nc = await connect({ servers: url.split(","), name: "mailctl", timeout: 5000 }).catch(
          (err: Error) => {
            throw new CommandError(`cannot reach NATS at ${url} (${err.message}): set NATS_URL`);
          },
        );
        try {
          await trackCommand(
            nc,
            rest[0],
            { sinceMs: duration(flags.since ?? "24h"), json: !!flags.json, scan: !!flags.scan },
            io,
          );
        } finally {
          await nc.close();
        }
        return 0;
      }
      default:
        throw new UsageError(`unknown command "${command}"`);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      io.stderr.write(`mailctl: ${err.message}\n\n${USAGE}`);
      return 2;
    }
    if (err instanceof CommandError || (err as Error).name === "DirectoryError") {
      io.stderr.write(`mailctl: ${(err as Error).message}\n`);
      return 1;
    }
    io.stderr.write(`mailctl: unexpected error: ${(err as Error).message}\n`);
    return 1;
  }
}
