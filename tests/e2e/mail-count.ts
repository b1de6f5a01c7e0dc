// Counting what arrived, by Message-ID, for the load tests that check nothing is lost (chaos,
// Redis failover): the Maildirs under a root, and a sink's messages through messageId().
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { waitFor } from "@mailpipe/testing";

/** The Message-ID header of a stored message (with its angle brackets), if it has one. */
export function messageId(raw: Buffer | string): string | undefined {
  const text = raw.toString("latin1");
  const head = text.slice(0, Math.max(0, text.indexOf("\r\n\r\n")) || text.length);
  return /^message-id:\s*(<[^>\r\n]+>)/im.exec(head)?.[1];
}

/** The Message-ID of every file in every Maildir's new/ and cur/ under `root` (one per file). */
export async function maildirIds(root: string): Promise<string[]> {
  const ids: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const e of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      if (!e.isDirectory()) continue;
      const path = join(dir, e.name);
      if (e.name === "new" || e.name === "cur") {
        for (const f of await readdir(path)) {
          const id = messageId(await readFile(join(path, f)));
          if (id) ids.push(id);
        }
      } else if (e.name !== "tmp") await walk(path);
    }
  };
  await walk(root);
  return ids;
}

/** One SMTP attempt of a load test: the message's Message-ID, and whether it was answered 250. */
export interface CountedAttempt {
  id: string;
  accepted: boolean;
}

/**
 * Waits (up to 90 s) until every accepted message arrived, then counts the arrivals of each
 * Message-ID. A message still missing then is left for the tally to report as lost.
 */
export async function countArrivals(
  attempts: readonly CountedAttempt[],
  arrived: () => Promise<(string | undefined)[]>,
): Promise<Map<string, number>> {
  const accepted = new Set(attempts.filter((a) => a.accepted).map((a) => a.id));
  await waitFor(
    async () => {
      const got = new Set(await arrived());
      return [...accepted].every((id) => got.has(id));
    },
    { timeoutMs: 90_000, intervalMs: 500, message: "every accepted message delivered" },
  ).catch(() => undefined); // the tally says what is missing
  const seen = new Map<string, number>();
  for (const id of await arrived()) if (id) seen.set(id, (seen.get(id) ?? 0) + 1);
  return seen;
}

/**
 * Per group of attempts (a fault, a phase): accepted, refused, delivered once or more, the accepted
 * ones that never arrived, and the duplicates; and the same as a Markdown table headed `column`.
 */
export function tally<G extends string, A extends CountedAttempt>(
  column: string,
  groups: readonly G[],
  attempts: readonly A[],
  groupOf: (a: A) => G,
  seen: ReadonlyMap<string, number>,
) {
  const rows = groups.map((group) => {
    const mine = attempts.filter((a) => groupOf(a) === group);
    const ok = mine.filter((a) => a.accepted);
    return {
      group,
      accepted: ok.length,
      refused: mine.length - ok.length,
      delivered: ok.filter((a) => seen.has(a.id)).length,
      lost: ok.filter((a) => !seen.has(a.id)).map((a) => a.id),
      duplicates: mine.filter((a) => (seen.get(a.id) ?? 0) > 1).map((a) => `${a.id}×${seen.get(a.id)}`),
    };
  });
  const line = (cells: (string | number)[]) => `| ${cells.map(String).join(" | ")} |`;
  const table = [
    line([column, "accepted", "refused", "delivered unique", "lost", "duplicates"]),
    line(["---", "---", "---", "---", "---", "---"]),
    ...rows.map((r) =>
      line([r.group, r.accepted, r.refused, r.delivered, r.lost.length, r.duplicates.length]),
    ),
  ].join("\n");
  return { rows, table };
}
