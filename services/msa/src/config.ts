import { directoryFileSetting } from "@mailpipe/directory";
import { baseConfig, bool, duration, port } from "@mailpipe/service-kit";
import { edgeConfig, filterConfig } from "@mailpipe/smtp-edge";
import { z } from "zod";

const required = (what: string) =>
  z
    .string({ error: `required: ${what}` })
    .trim()
    .min(1, { error: `required: ${what}` });

const count = (defaultValue: number, min = 0) => z.coerce.number().int().min(min).default(defaultValue);

/**
 * The submission service's environment. Listener, size, connection and timeout names are the same
 * as mx's where they mean the same thing; every default is in README.md.
 */
export const msaConfig = baseConfig.extend({
  DIRECTORY_FILE: directoryFileSetting(),
  TLS_CERT_FILE: required("msa accepts logins only over TLS: the PEM certificate chain for 587 and 465"),
  TLS_KEY_FILE: required("msa accepts logins only over TLS: the PEM private key of TLS_CERT_FILE"),

  MSA_HOST: z.string().min(1).default("0.0.0.0"),
  /** STARTTLS, then AUTH (RFC 6409) */
  MSA_SUBMISSION_PORT: port(587),
  /** implicit TLS (RFC 8314) */
  MSA_SUBMISSIONS_PORT: port(465),

  ...edgeConfig,
  ...filterConfig,
  /** expect a PROXY protocol v1 header from the load balancer, so brute-force counts, limits and logs see the client's IP */
  MSA_PROXY_PROTOCOL: bool(false),

  AUTH_FAIL_WINDOW: duration("15m"),
  AUTH_FAIL_SLOWDOWN_AFTER: count(3),
  AUTH_FAIL_DELAY_STEP: duration("1s"),
  AUTH_FAIL_DELAY_MAX: duration("5s"),
  AUTH_FAIL_LIMIT_IP: count(10),
  AUTH_FAIL_LIMIT_USER: count(5),
  AUTH_LOCKOUT: duration("15m"),
  AUTH_LOCKED_CLOSE_AFTER: count(3, 1),

  RATE_MESSAGES_PER_HOUR: count(200),
  RATE_RECIPIENTS_PER_MESSAGE: count(100, 1),

  MSA_RECEIVED_CLIENT_DETAILS: bool(false),
  MSA_RECEIVED_AUTH_USER: bool(false),
});

export type MsaConfig = z.infer<typeof msaConfig>;
