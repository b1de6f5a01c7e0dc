import { type Reply, reply } from "@mailpipe/contracts";

// Replies only the router gives, which @mailpipe/contracts has no constructor for yet.
export const routerReplies = {
  /** an operator removed the recipient from the queue (mailctl delete) */
  deletedByOperator: (): Reply => reply(550, "5.0.0", "Removed from the queue by the mail administrator"),
};
