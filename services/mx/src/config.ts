import { directoryFileSetting } from "@mailpipe/directory";
import { dnsServersSetting } from "@mailpipe/dns";
import { baseConfig, bool, port } from "@mailpipe/service-kit";
import { edgeConfig, filterConfig } from "@mailpipe/smtp-edge";
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
    ...edgeConfig,
    ...filterConfig,
    /** per transaction: 452 4.5.3 beyond */
    MAX_RECIPIENTS: count(100),
    /** expect a PROXY protocol v1 header from the load balancer, so limits, SPF and logs see the client's IP */
    MX_PROXY_PROTOCOL: bool(false),
    DIRECTORY_FILE: directoryFileSetting(),
    /** host[:port] list for SPF/DKIM/DMARC/ARC and reverse lookups; empty: the nameservers of /etc/resolv.conf */
    DNS_SERVERS: dnsServersSetting(),
    /** PEM certificate chain and key for STARTTLS; without both, STARTTLS is not offered */
    TLS_CERT_FILE: optionalFile,
    TLS_KEY_FILE: optionalFile,
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
