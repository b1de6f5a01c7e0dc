// Counting what arrived, by Message-ID, for the load tests that check nothing is lost (chaos,
// Redis failover): the Maildirs under a root, and a sink's messages through messageId().
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";

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
