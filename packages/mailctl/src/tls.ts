import {
  type DayResults,
  normalizeDomain,
  parseDayResults,
  type StsPolicy,
  tlsDayOf,
  tlsKeys,
} from "@mailpipe/contracts";
import { type Io, out, UsageError } from "./io.ts";
import { withRedis } from "./redis.ts";

const DAYS_KEPT = 7;

/** `mailctl tls <domain>`: the MTA-STS policy delivery cached, and the TLS results of the last days. */
export async function tlsCommand(
  args: string[],
  flags: { json?: boolean | undefined },
  io: Io,
): Promise<void> {
  const raw = args[0];
  if (!raw) throw new UsageError("usage: mailctl tls <domain> [--json]");
  const domain = normalizeDomain(raw);
  if (!domain) throw new UsageError(`"${raw}" is not a domain`);
  await withRedis(io, async (redis) => {
    const [policyJson, failureJson] = await Promise.all([
      redis.get(tlsKeys.stsPolicy(domain)),
      redis.get(tlsKeys.stsFailure(domain)),
    ]);
    const policy = policyJson ? (JSON.parse(policyJson) as StsPolicy) : undefined;
    const failure = failureJson
      ? (JSON.parse(failureJson) as { id: string; type: string; detail: string; at: string })
      : undefined;
    const days: DayResults[] = [];
    for (let i = 0; i < DAYS_KEPT; i++) {
      const day = tlsDayOf(new Date(Date.now() - i * 86_400_000));
      const h = await redis.hgetall(tlsKeys.reportDay(day, domain));
      if (Object.keys(h).length > 0) days.push(parseDayResults(day, domain, h));
    }
    if (flags.json) {
      out(
        io,
        JSON.stringify(
          { domain, mtaSts: policy ?? null, fetchFailure: failure ?? null, results: days },
          null,
          2,
        ),
      );
      return;
    }
    out(io, `${domain}`);
    if (policy) {
      out(
        io,
        `  MTA-STS policy id ${policy.id}: mode ${policy.mode}, mx ${policy.mx.join(", ") || "(none)"}`,
      );
      out(io, `    fetched ${policy.fetchedAt}, max_age ${policy.maxAge}s, cached until ${policy.expiresAt}`);
    } else {
      out(io, "  MTA-STS: no policy cached (none published, not fetched yet, or expired)");
    }
    if (failure)
      out(
        io,
        `  last policy fetch failed (id ${failure.id}, ${failure.at}): ${failure.type}: ${failure.detail}`,
      );
    if (days.length === 0) {
      out(
        io,
        `  no TLS results in the last ${DAYS_KEPT} days (only destinations with MTA-STS or DANE are counted)`,
      );
      return;
    }
    for (const d of days) {
      const types = Object.keys({ ...d.policies, ...d.successes }) as (keyof DayResults["successes"])[];
      for (const t of types) {
        const failed = d.failures.filter((f) => f.policy === t);
        const failedCount = failed.reduce((n, f) => n + f.count, 0);
        out(io, `  ${d.day} ${t}: ${d.successes[t] ?? 0} sessions ok, ${failedCount} failed`);
        for (const f of failed) {
          out(
            io,
            `    ${f.count} × ${f.resultType}${f.mxHost ? ` at ${f.mxHost}` : ""}${f.ip ? ` [${f.ip}]` : ""}`,
          );
        }
      }
    }
  });
}
