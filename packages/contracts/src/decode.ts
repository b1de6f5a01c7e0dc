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

/** Parses JSON bytes against a contract. */
export function decodeJson<S extends z.ZodType>(
  schema: S,
  bytes: Uint8Array | string,
  what = "message",
): z.infer<S> {
  let value: unknown;
  try {
    value = JSON.parse(typeof bytes === "string" ? bytes : Buffer.from(bytes).toString("utf8"));
  } catch (err) {
    throw new ContractError(what, [
      { code: "custom", path: [], message: `not JSON (${(err as Error).message})`, input: undefined },
    ]);
  }
  return decode(schema, value, what);
}
