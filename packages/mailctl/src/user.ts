import { parseAddress } from "@mailpipe/contracts";
import { Directory, hashPassword, removeUser, setUser } from "@mailpipe/directory";
import { CommandError, type Io, out, promptHidden, readLine, UsageError } from "./io.ts";

const MIN_PASSWORD = 10;

async function readPassword(io: Io): Promise<string> {
  if (io.stdin.isTTY) {
    const first = await promptHidden(io, "New password: ");
    const second = await promptHidden(io, "Repeat it: ");
    if (first !== second) throw new CommandError("the two passwords differ; nothing was changed");
    return first;
  }
  return readLine(io.stdin);
}

/** `mailctl user add|passwd|del|list` */
export async function userCommand(
  args: string[],
  flags: { quota?: string },
  io: Io,
  directoryFile: string,
): Promise<void> {
  const [action, address] = args;
  if (action === "list") {
    const dir = await Directory.load(directoryFile);
    for (const u of dir.users()) {
      const user = dir.user(u)!;
      out(
        io,
        `${u}${user.quota ? `  quota ${user.quota}` : ""}${user.hasPassword ? "" : "  (no password: receive only)"}`,
      );
    }
    return;
  }
  if (!action || !address) throw new UsageError("usage: mailctl user add|passwd|del <address> [--quota 1G]");
  if (!parseAddress(address)) throw new CommandError(`"${address}" is not an email address`);
  if (action === "del") {
    if (!(await removeUser(directoryFile, address)))
      throw new CommandError(`no user ${address} in ${directoryFile}`);
    out(io, `removed ${address}`);
    return;
  }
  if (action !== "add" && action !== "passwd") throw new UsageError(`unknown user action "${action}"`);
  if (action === "passwd") {
    const dir = await Directory.load(directoryFile);
    if (!dir.hasUser(address))
      throw new CommandError(`no user ${address} in ${directoryFile}: use "mailctl user add"`);
  }
  const password = await readPassword(io);
  if (password.length < MIN_PASSWORD) {
    throw new CommandError(
      `the password is too short: use at least ${MIN_PASSWORD} characters; nothing was changed`,
    );
  }
  const passwordHash = await hashPassword(password);
  const result = await setUser(directoryFile, address, {
    passwordHash,
    ...(flags.quota !== undefined ? { quota: flags.quota } : {}),
  });
  out(
    io,
    `${result === "created" ? "added" : "updated"} ${address} in ${directoryFile} (services reload it within seconds)`,
  );
}
