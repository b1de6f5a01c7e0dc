// EHLO and AUTH stage: the ESMTP extensions offered, and AUTH PLAIN/LOGIN through the service's
// auth hook (AUTH is offered only when the service gives one, and only over TLS).
import { replies, SmtpError } from "@mailpipe/contracts";
import type { SMTPServerOptions } from "smtp-server";
import { asSmtpError, clientOf, type EdgeContext } from "./edge-context.ts";
import type { EdgeHooks } from "./hooks.ts";
import type { SmtpEdgeOptions } from "./options.ts";

export function ehloOptions(options: SmtpEdgeOptions, hooks: EdgeHooks): SMTPServerOptions {
  return {
    size: options.maxMessageSize,
    hideSize: false,
    hideENHANCEDSTATUSCODES: false,
    // RFC 3461: smtp-server checks NOTIFY and RET values and ORCPT's form (501 5.5.4); mail-rcpt.ts
    // decodes ENVID and ORCPT and carries them in the envelope. REQUIRETLS is not honoured yet.
    hideDSN: false,
    hideREQUIRETLS: true,
    disabledCommands: hooks.auth ? [] : ["AUTH"],
    authMethods: ["PLAIN", "LOGIN"],
    authOptional: !hooks.auth,
    allowInsecureAuth: false,
  };
}

export function authHandler(edge: EdgeContext): Pick<SMTPServerOptions, "onAuth"> {
  const { hooks, log } = edge;
  return {
    onAuth(auth, session, callback) {
      const verify = hooks.auth;
      if (!verify || (auth.method !== "PLAIN" && auth.method !== "LOGIN")) {
        return callback(new SmtpError(replies.authFailed()));
      }
      const credentials = {
        method: auth.method,
        username: auth.username ?? "",
        password: auth.password ?? "",
      };
      Promise.resolve()
        .then(() => verify(credentials, clientOf(session)))
        .then(
          (user) => (user ? callback(null, { user }) : callback(new SmtpError(replies.authFailed()))),
          (err) => {
            const smtp = asSmtpError(err);
            if (!smtp) log.error({ err }, "auth hook failed");
            callback(smtp ?? new SmtpError(replies.localError(), { cause: err }));
          },
        );
    },
  };
}
