import { parseServerList } from "@mailpipe/dns";
import { baseConfig, bool, byteSize, duration, port } from "@mailpipe/service-kit";
import { z } from "zod";

const count = (defaultValue: number, min = 1) => z.coerce.number().int().min(min).default(defaultValue);

const optionalFile = z
  .string()
  .trim()
  .optional()
  .transform((v) => (v ? v : undefined));

/** mx's environment, parsed once at start. README.md lists every variable with its default. */
export const mxConfig = baseConfig
  .extend({
    MX_HOST: z.string().min(1).default("0.0.0.0"),
    MX_PORT: port(25),
    MAX_MESSAGE_SIZE: byteSize("25M"),
    MAX_RECIPIENTS: count(100),
    MAX_CONNECTIONS: count(1000),
    MAX_CONNECTIONS_PER_IP: count(20),
    SMTP_IDLE_TIMEOUT: duration("5m"),
    SMTP_DATA_TIMEOUT: duration("10m"),
    SMTP_SESSION_TIMEOUT: duration("30m"),
    /** storing + publishing one message may take this long before the client gets 451 */
    SMTP_ACCEPT_TIMEOUT: duration("30s"),
    /** more Received fields than this is a mail loop: 554 5.4.6 */
    MAX_RECEIVED_HEADERS: count(50),
    /** expect a PROXY protocol v1 header from the load balancer, so limits, SPF and logs see the client's IP */
    MX_PROXY_PROTOCOL: bool(false),
    DIRECTORY_FILE: z.string().min(1).default("/etc/mailpipe/directory.yaml"),
    /** host[:port] list for SPF/DKIM/DMARC/ARC and reverse lookups; empty: the nameservers of /etc/resolv.conf */
    DNS_SERVERS: z
      .string()
      .default("")
      .transform((v, ctx) => {
        try {
          return parseServerList(v);
        } catch (err) {
          ctx.addIssue({ code: "custom", message: (err as Error).message });
          return z.NEVER;
        }
      }),
    /** PEM certificate chain and key for STARTTLS; without both, STARTTLS is not offered */
    TLS_CERT_FILE: optionalFile,
    TLS_KEY_FILE: optionalFile,
    TLS_RELOAD_INTERVAL: duration("5s"),
  })
  .superRefine((c, ctx) => {
    if (!!c.TLS_CERT_FILE !== !!c.TLS_KEY_FILE) {
      ctx.addIssue({
        code: "custom",
        path: [c.TLS_CERT_FILE ? "TLS_KEY_FILE" : "TLS_CERT_FILE"],
        message: "TLS_CERT_FILE and TLS_KEY_FILE go together: set both (STARTTLS) or neither",
      });
    }
  });

export type MxConfig = z.infer<typeof mxConfig>;
