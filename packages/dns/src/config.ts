import { z } from "zod";
import { parseServerList } from "./servers.ts";

/** `DNS_SERVERS`: a `host[:port]` list; empty means the nameservers of /etc/resolv.conf. */
export const dnsServersSetting = () =>
  z
    .string()
    .default("")
    .transform((v, ctx) => {
      try {
        return parseServerList(v);
      } catch (err) {
        ctx.addIssue({ code: "custom", message: (err as Error).message });
        return z.NEVER;
      }
    });
