import type { z } from "zod";

/** A bus message that does not match its contract. The message says which field and why. */
export class ContractError extends Error {
  override name = "ContractError";
  readonly issues: readonly z.core.$ZodIssue[];
  constructor(what: string, issues: readonly z.core.$ZodIssue[]) {
    const detail = issues
      .slice(0, 5)
      .map((i) => `${i.path.length ? i.path.join(".") : "(root)"}: ${i.message}`)
      .join("; ");
    super(`invalid ${what}: ${detail}${issues.length > 5 ? ` (and ${issues.length - 5} more)` : ""}`);
    this.issues = issues;
  }
}

/** Parses a value against a contract, throwing a ContractError that names the bad fields. */
export function decode<S extends z.ZodType>(schema: S, value: unknown, what = "message"): z.infer<S> {
  const r = schema.safeParse(value);
  if (!r.success) throw new ContractError(what, r.error.issues);
  return r.data;
}

/**
 * A message from a newer version of the pipeline may carry fields this version does not know (a
 * rolling upgrade runs both). With `onUnknownFields`, such fields are dropped and reported (as
 * `path.field`) and the rest is checked as usual; without it, or when anything else is wrong, the
 * message is refused. Publishing stays strict: a service only writes fields it knows.
 */
export interface DecodeOptions {
  onUnknownFields?: (fields: string[]) => void;
}

function withoutUnknownFields(value: unknown, issues: readonly z.core.$ZodIssue[]): string[] | undefined {
  if (issues.length === 0) return undefined;
  const dropped: string[] = [];
  for (const issue of issues) {
    if (issue.code !== "unrecognized_keys") return undefined;
    let at: unknown = value;
    for (const step of issue.path)
      at = (at as Record<PropertyKey, unknown> | undefined)?.[step as PropertyKey];
    if (typeof at !== "object" || at === null) return undefined;
    for (const key of issue.keys) {
      delete (at as Record<string, unknown>)[key];
      dropped.push([...issue.path, key].join("."));
    }
  }
  return dropped.sort();
}

/** Parses JSON bytes against a contract. */
export function decodeJson<S extends z.ZodType>(
  schema: S,
  bytes: Uint8Array | string,
  what = "message",
  opts: DecodeOptions = {},
): z.infer<S> {
  let value: unknown;
  try {
    value = JSON.parse(typeof bytes === "string" ? bytes : Buffer.from(bytes).toString("utf8"));
  } catch (err) {
    throw new ContractError(what, [
      { code: "custom", path: [], message: `not JSON (${(err as Error).message})`, input: undefined },
    ]);
  }
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const dropped = opts.onUnknownFields ? withoutUnknownFields(value, r.error.issues) : undefined;
  if (!dropped) throw new ContractError(what, r.error.issues);
  // the value was just parsed from JSON, so it is ours to change; what is left must match in full
  const data = decode(schema, value, what);
  opts.onUnknownFields?.(dropped);
  return data;
}
