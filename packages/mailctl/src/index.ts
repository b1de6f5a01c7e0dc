export { run, USAGE } from "./cli.ts";
export type { Io } from "./io.ts";
export { parseQuery, readEvents, type Timeline, timelines } from "./track.ts";
