export interface DirectoryIssue {
  /** where in the file, e.g. `users["alice@example.test"].quota` (empty for file-level problems) */
  path: string;
  message: string;
  /** 1-based position of the offending key or value, when known */
  line?: number;
  column?: number;
}

/** A directory file that cannot be used. The message names the file, the path and what is wrong. */
export class DirectoryError extends Error {
  override name = "DirectoryError";
  readonly file: string;
  readonly issues: readonly DirectoryIssue[];

  constructor(file: string, issues: readonly DirectoryIssue[]) {
    const lines = issues.map((i) => {
      const at = i.line !== undefined ? `${file}:${i.line}:${i.column ?? 1}` : file;
      return i.path ? `${at}: ${i.path}: ${i.message}` : `${at}: ${i.message}`;
    });
    const head =
      issues.length === 1 ? "invalid directory file" : `invalid directory file (${issues.length} problems)`;
    super(`${head}\n${lines.join("\n")}`);
    this.file = file;
    this.issues = issues;
  }
}
