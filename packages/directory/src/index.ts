export { developmentDirectory, dkimDnsRecord, generateDkimKey } from "./dev.ts";
export {
  Directory,
  type DkimKey,
  type DomainPolicy,
  dkimSignOptions,
  type LocalRecipient,
  MAX_ALIAS_DEPTH,
  type Resolution,
  type ResolveOptions,
  type User,
} from "./directory.ts";
export { addDomain, type DkimSettings, removeUser, setDkim, setUser, type UserChanges } from "./edit.ts";
export { DirectoryError, type DirectoryIssue } from "./errors.ts";
export { DEFAULT_SCRYPT, hashPassword, type ScryptParams, verifyHash } from "./password.ts";
export { DKIM_ALGORITHMS, type DkimAlgorithm, parseSize } from "./schema.ts";
export { directoryFileSetting } from "./setting.ts";
export { isSrsLocal, Srs, type SrsOptions, type SrsReverse } from "./srs.ts";
export { type DirectoryWatcher, type WatchOptions, watchDirectory } from "./watch.ts";
