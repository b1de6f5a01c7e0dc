import { PassThrough } from "node:stream";
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
    const block = headerBlock(chunks);
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
    expect(headerBlock([Buffer.from("\r\nReceived: x\r\n")]).length).toBe(0);
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

  it("honours smtp-server's sizeExceeded flag", async () => {
    const r = await readMessage(streamOf(["S: s\r\n\r\nsmall\r\n"], { sizeExceeded: true }), {
      maxBytes: 1000,
    });
    expect(r.ok).toBe(false);
  });
});
