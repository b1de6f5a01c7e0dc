import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type TempDir, tempDir } from "@mailpipe/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { maildirUsage, QuotaTracker } from "./quota.ts";

let dir: TempDir;
beforeEach(async () => {
  dir = await tempDir("mda-quota");
});
afterEach(async () => {
  await dir.remove();
});

async function put(path: string, bytes: number): Promise<void> {
  await mkdir(join(path, ".."), { recursive: true });
  await writeFile(path, Buffer.alloc(bytes, 120));
}

describe("maildirUsage", () => {
  it("sums ,S= sizes (stat when missing) in new/ and cur/ of the Maildir and its folders", async () => {
    const md = join(dir.path, "Maildir");
    await put(join(md, "new", "1.Qa.host,S=1000"), 3); // the name's size counts, not the bytes
    await put(join(md, "cur", "2.Qb.host,S=2000:2,S"), 3);
    await put(join(md, "cur", "3.plain.host:2,"), 700); // no S=: stat
    await put(join(md, ".news", "new", "4.Qc.host,S=400"), 1);
    await put(join(md, ".news", "cur", "5.Qd.host,S=50,W=52:2,RS"), 1);
    await put(join(md, "tmp", "6.Qe.host,S=99999"), 1); // tmp does not count
    await put(join(md, "subscriptions"), 10); // nor other files
    expect(await maildirUsage(md)).toBe(1000 + 2000 + 700 + 400 + 50);
  });

  it("is 0 for a mailbox that does not exist yet", async () => {
    expect(await maildirUsage(join(dir.path, "nobody", "Maildir"))).toBe(0);
  });
});

describe("QuotaTracker", () => {
  it("refuses what would pass the quota and counts what it let through", async () => {
    let scans = 0;
    const q = new QuotaTracker({
      cacheMs: 60_000,
      scan: async () => {
        scans++;
        return 900;
      },
    });
    expect(await q.reserve("/m", 1000, 200)).toBe(false);
    expect(await q.reserve("/m", 1000, 100)).toBe(true); // exactly full is allowed
    expect(await q.reserve("/m", 1000, 1)).toBe(false); // the 100 are counted
    q.release("/m", 1000, 100);
    expect(await q.reserve("/m", 1000, 50)).toBe(true);
    expect(scans).toBe(1); // cached
    expect(await q.reserve("/m", undefined, 10 ** 12)).toBe(true); // unlimited
  });

  it("lets only one of two concurrent deliveries that do not both fit through", async () => {
    const q = new QuotaTracker({ scan: async () => 0 });
    const r = await Promise.all([q.reserve("/m", 1000, 600), q.reserve("/m", 1000, 600)]);
    expect(r.sort()).toEqual([false, true]);
  });

  it("counts from disk again once the cache expires", async () => {
    let usage = 0;
    const q = new QuotaTracker({ cacheMs: 50, scan: async () => usage });
    expect(await q.reserve("/m", 1000, 600)).toBe(true);
    usage = 100; // Dovecot expunged mail meanwhile
    await new Promise((r) => setTimeout(r, 80));
    expect(await q.reserve("/m", 1000, 800)).toBe(true);
  });
});
