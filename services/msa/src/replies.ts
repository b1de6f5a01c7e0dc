import { reply } from "@mailpipe/contracts";

/** Replies only the submission service sends (contracts' `replies` has no constructor for them). */
export const msaReplies = {
  nullSender: () => reply(553, "5.7.1", "The null sender <> cannot be used to submit mail"),
  noFromHeader: () => reply(550, "5.6.0", "Message has no From header field: add one and send again"),
  manyFromHeaders: () =>
    reply(550, "5.6.0", "Message has more than one From header field (RFC 5322 allows one)"),
  badFromHeader: () => reply(550, "5.6.0", "The From header field holds no usable address"),
  /** the brute-force store (Redis) did not answer: refuse the login for now rather than go unguarded */
  authUnavailable: () => reply(454, "4.7.0", "Temporary authentication failure, try again later"),
};
