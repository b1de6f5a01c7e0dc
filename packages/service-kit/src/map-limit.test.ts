import { describe, expect, it } from "vitest";
import { mapLimit } from "./map-limit.ts";

describe("mapLimit", () => {
  it("keeps the input order whatever order the calls finish in", async () => {
    const items = [5, 1, 4, 2, 3];
    const gates = items.map(() => Promise.withResolvers<void>());
    const finished: number[] = [];
    const results = mapLimit(items, items.length, async (n, i) => {
      await gates[i]!.promise;
      finished.push(n);
      return `${i}:${n * 10}`;
    });
    for (const i of [1, 3, 4, 2, 0]) gates[i]!.resolve();
    expect(await results).toEqual(["0:50", "1:10", "2:40", "3:20", "4:30"]);
    expect(finished).toEqual([1, 2, 3, 4, 5]);
  });

  it("has at most `limit` calls in flight and makes every call once", async () => {
    let inFlight = 0;
    let most = 0;
    const seen: number[] = [];
    const results = await mapLimit(
      Array.from({ length: 20 }, (_, i) => i),
      3,
      async (n) => {
        inFlight++;
        most = Math.max(most, inFlight);
        seen.push(n);
        await new Promise((resolve) => setImmediate(resolve));
        inFlight--;
        return n * 2;
      },
    );
    expect(most).toBe(3);
    expect(seen.sort((a, b) => a - b)).toEqual(Array.from({ length: 20 }, (_, i) => i));
    expect(results).toEqual(Array.from({ length: 20 }, (_, i) => i * 2));
  });

  it("calls nothing for no items, and rejects with the first error", async () => {
    expect(await mapLimit([], 4, async () => 1)).toEqual([]);
    await expect(
      mapLimit([1, 2, 3], 2, async (n) => {
        if (n === 2) throw new Error("two failed");
        return n;
      }),
    ).rejects.toThrow("two failed");
  });
});
