import { PassThrough, Readable } from "node:stream";
import { describe, expect, it } from "vitest";
import { headerBlock, LineEndingNormalizer, parseHeaderBlock, readMessage } from "./intake.ts";

function normalize(input: string, cuts: number[] = []): string {
  const n = new LineEndingNormalizer();
  const bytes = Buffer.from(input, "latin1");
  const out: Buffer[] = [];
  let at = 0;
  for (const cut of [...cuts, bytes.length]) {
    out.push(n.push(bytes.subarray(at, cut)));
    at = cut;
  }
  out.push(n.end());
  return Buffer.concat(out).toString("latin1");
}

function streamOf(parts: string[], extra: { sizeExceeded?: boolean } = {}): PassThrough {
  const s = new PassThrough() as PassThrough & { sizeExceeded?: boolean };
  Object.assign(s, extra);
  for (const p of parts) s.write(Buffer.from(p, "latin1"));
  s.end();
  return s;
}

describe("line-ending normalisation", () => {
  it("turns bare LF and bare CR into CRLF and leaves CRLF alone", () => {
    expect(normalize("a\r\nb\nc\rd\r\n")).toBe("a\r\nb\r\nc\r\nd\r\n");
    expect(normalize("\n.\n")).toBe("\r\n.\r\n");
    expect(normalize("\r.\r")).toBe("\r\n.\r\n");
    expect(normalize("x\r\r\ny")).toBe("x\r\n\r\ny");
    expect(normalize("x\n\ry")).toBe("x\r\n\r\ny");
    expect(normalize("clean\r\n")).toBe("clean\r\n");
  });

  it("gives the same bytes however the input is split into chunks", () => {
    const input = "H: v\r\n\r\nline\nbare\rcr\r\n.\r\nend\r";
    const whole = normalize(input);
    expect(whole).toBe("H: v\r\n\r\nline\r\nbare\r\ncr\r\n.\r\nend\r\n");
    for (let a = 0; a <= input.length; a++) {
      for (let b = a; b <= input.length; b += 3) expect(normalize(input, [a, b])).toBe(whole);
    }
  });

  it("returns a clean chunk itself, without copying it", () => {
    const n = new LineEndingNormalizer();
    const chunk = Buffer.from("a\r\nb\r\n");
    expect(n.push(chunk)).toBe(chunk);
  });
});

describe("header block", () => {
  it("finds the header block across chunks and unfolds fields", () => {
    const chunks = [
      "Received: from a\r\n\tby b; x\r\nMessage",
      "-ID:  <id@x.test> \r\nSubject: hi\r",
      "\n\r\nbody\r\n",
    ].map((s) => Buffer.from(s));
    const block = headerBlock(chunks)!;
    expect(block.toString()).toBe(
      "Received: from a\r\n\tby b; x\r\nMessage-ID:  <id@x.test> \r\nSubject: hi\r\n",
    );
    expect(parseHeaderBlock(block)).toEqual([
      { name: "Received", value: "from a\tby b; x" },
      { name: "Message-ID", value: "<id@x.test>" },
      { name: "Subject", value: "hi" },
    ]);
  });

  it("has no fields when the message starts with an empty line", () => {
    expect(headerBlock([Buffer.from("\r\nReceived: x\r\n")])!.length).toBe(0);
    expect(headerBlock([Buffer.from("\r"), Buffer.from("\nReceived: x\r\n")])!.length).toBe(0);
  });

  it("finds the same block however the message is split, the empty line straddling any boundary", () => {
    const message = "A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n";
    const whole = "A: 1\r\nB: 2\r\n";
    const split = (cuts: number[]) =>
      [0, ...cuts].map((at, i) => Buffer.from(message.slice(at, [...cuts, message.length][i])));
    for (let a = 0; a <= message.length; a++) {
      for (let b = a; b <= message.length; b++) {
        expect(headerBlock(split([a, b]))!.toString(), `cuts ${a} ${b}`).toBe(whole);
      }
    }
    expect(headerBlock([...message].map((ch) => Buffer.from(ch)))!.toString()).toBe(whole);
    // no empty line: the whole message is its header block
    expect(headerBlock(split([3, 9]).slice(0, 2))!.toString()).toBe("A: 1\r\nB: ");
  });

  it("stops at the cap: a 25 MiB header block is refused after looking at about 1 MiB of it", () => {
    const line = "X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    const chunk = Buffer.from(line.repeat(Math.ceil(16_384 / line.length)));
    const all = Array.from({ length: Math.ceil((25 * 1024 * 1024) / chunk.length) }, () => chunk);
    let furthest = -1;
    const watched = new Proxy(all, {
      get(target, key, receiver) {
        if (typeof key === "string" && /^\d+$/.test(key)) furthest = Math.max(furthest, Number(key));
        return Reflect.get(target, key, receiver);
      },
    });
    expect(headerBlock(watched, 1024 * 1024)).toBeUndefined();
    expect(furthest).toBeLessThanOrEqual(Math.ceil((1024 * 1024) / chunk.length));

    // an end of headers just under the cap is found, and the block is exact
    const under = all.slice(0, Math.floor((1024 * 1024) / chunk.length) - 1);
    const found = headerBlock([...under, Buffer.from("Last: x\r\n\r\nbody")], 1024 * 1024)!;
    expect(found.length).toBe(under.length * chunk.length + "Last: x\r\n".length);
    expect(found.subarray(-12).toString()).toBe("a\r\nLast: x\r\n");
  });
});

describe("readMessage", () => {
  it("normalises, counts Received fields and reads the Message-ID", async () => {
    const r = await readMessage(
      streamOf(["Received: a\nReceived: b\r\nMessage-ID: <m1@x.test>\r\nSubject: s\n\nbody\n"]),
      { maxBytes: 1000 },
    );
    expect(r.ok).toBe(true);
    if (!r.ok) return;
    expect(Buffer.concat(r.message.chunks).toString()).toBe(
      "Received: a\r\nReceived: b\r\nMessage-ID: <m1@x.test>\r\nSubject: s\r\n\r\nbody\r\n",
    );
    expect(r.message.size).toBe(Buffer.concat(r.message.chunks).length);
    expect(r.message.receivedCount).toBe(2);
    expect(r.message.messageId).toBe("<m1@x.test>");
    expect(r.message.header("subject")).toEqual(["s"]);
  });

  it("stops keeping bytes once over the limit but reads to the end", async () => {
    const big = "x".repeat(600);
    const s = streamOf(["Subject: s\r\n\r\n", big, big, "tail\r\n"]);
    const r = await readMessage(s, { maxBytes: 1000 });
    expect(r).toMatchObject({ ok: false, reason: "too-big" });
    expect(s.readableEnded).toBe(true);
  });

  it("counts the bytes normalisation adds against the limit", async () => {
    // 600 bare LFs are 600 bytes on the wire and 1200 once normalised
    const r = await readMessage(streamOf(["S: s\r\n\r\n", "\n".repeat(600)]), { maxBytes: 1000 });
    expect(r.ok).toBe(false);
  });

  it("refuses a header block over maxHeaderBytes, reading to the end", async () => {
    const line = "X-Filler: 0123456789012345678901234567890123456789\r\n";
    const s = streamOf([line.repeat(100), "\r\nbody\r\n"]);
    const r = await readMessage(s, { maxBytes: 100_000, maxHeaderBytes: 50 * line.length });
    expect(r).toMatchObject({ ok: false, reason: "header-too-big" });
    expect(s.readableEnded).toBe(true);
    const ok = await readMessage(streamOf([line.repeat(40), "\r\nbody\r\n"]), {
      maxBytes: 100_000,
      maxHeaderBytes: 50 * line.length,
    });
    expect(ok.ok).toBe(true);
  });

  it("takes every byte it keeps from the lease; when one does not fit, drops it all and reads on", async () => {
    let free = 1000;
    let taken = 0;
    let released = 0;
    const lease = {
      take: (n: number) => {
        if (n > free) return false;
        free -= n;
        taken += n;
        return true;
      },
      release: () => {
        free += taken;
        released += taken;
        taken = 0;
      },
    };
    const part = "y".repeat(400);
    // one chunk per part (a PassThrough would hand them over joined)
    const s = Readable.from(["Subject: s\r\n\r\n", part, part, part, "end\r\n"].map((p) => Buffer.from(p)));
    const r = await readMessage(s, { maxBytes: 10_000, lease });
    expect(r).toMatchObject({ ok: false, reason: "no-memory" });
    expect(s.readableEnded).toBe(true);
    expect([taken, free, released]).toEqual([0, 1000, 14 + 800]);

    // the size limit wins: the client must not retry a message that can never fit
    const big = await readMessage(streamOf(["S: s\r\n\r\n", "z".repeat(900), "z".repeat(900)]), {
      maxBytes: 1500,
      lease,
    });
    expect(big).toMatchObject({ ok: false, reason: "too-big" });

    const fits = await readMessage(streamOf(["S: s\r\n\r\nsmall\r\n"]), { maxBytes: 10_000, lease });
    expect(fits.ok).toBe(true);
    expect(taken).toBe("S: s\r\n\r\nsmall\r\n".length);
  });

  it("honours smtp-server's sizeExceeded flag", async () => {
    const r = await readMessage(streamOf(["S: s\r\n\r\nsmall\r\n"], { sizeExceeded: true }), {
      maxBytes: 1000,
    });
    expect(r.ok).toBe(false);
  });
});
