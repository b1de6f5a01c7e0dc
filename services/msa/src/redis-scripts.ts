import type { Redis } from "ioredis";

/** Registers a Lua script as a command (EVALSHA, loaded on first use) unless the client has it already. */
export function defineOnce(redis: Redis, name: string, lua: string, numberOfKeys: number): void {
  if (typeof (redis as unknown as Record<string, unknown>)[name] === "function") return;
  redis.defineCommand(name, { lua, numberOfKeys });
}
