// An Io for running mailctl commands in tests: stdin from a string, stdout and stderr collected.
import { PassThrough, Readable } from "node:stream";
import type { Io } from "../src/io.ts";

export function testIo(
  stdinText = "",
  env: NodeJS.ProcessEnv = {},
): { io: Io; out: () => string; err: () => string } {
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  let o = "";
  let e = "";
  stdout.on("data", (c) => {
    o += c;
  });
  stderr.on("data", (c) => {
    e += c;
  });
  return {
    io: { stdin: Readable.from([stdinText]), stdout, stderr, env },
    out: () => o,
    err: () => e,
  };
}
