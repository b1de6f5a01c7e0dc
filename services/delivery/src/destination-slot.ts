// The worker's side of the cluster-wide destination limits. The router took a slot for the request
// before publishing it (services/router/src/admission.ts); the worker only keeps it: a request that
// starts well within its lease needs no Redis round trip, one that arrives late (it waited in
// MAIL_DELIVER, or was redelivered after a worker died) checks that its slot still holds, or takes a
// free one, before it opens a session; and a long transaction renews the lease while it runs. The
// slot is released by the router when it applies the request's status.
import type { RequestSlot } from "@mailpipe/contracts";
import type { DestinationSlots } from "@mailpipe/queue";
import type { Logger } from "@mailpipe/telemetry";

export interface SlotKeeper {
  /** before the transaction: whether it may start (false: its site is full, send it back) */
  enter(slot: RequestSlot | undefined): Promise<boolean>;
  /** keeps the slot's lease while the transaction runs; call the result when it is over */
  hold(slot: RequestSlot | undefined): () => void;
}

export function slotKeeper(
  slots: Pick<DestinationSlots, "renew"> | undefined,
  log: Logger,
  now: () => number = Date.now,
): SlotKeeper {
  let warnedAt = 0;
  const warn = (fields: object, msg: string) => {
    // with Redis away every request would say so: once a minute is enough
    if (now() - warnedAt < 60_000) return;
    warnedAt = now();
    log.warn(fields, msg);
  };
  return {
    async enter(slot) {
      if (!slot || !slots) return true;
      // a lease at least half left outlasts the first renewal (a third of the lease from now)
      if (now() < slot.until - slot.leaseMs / 2) return true;
      try {
        const r = await slots.renew(slot, now() + slot.leaseMs, now());
        if (r === "full") {
          log.info(
            { site: slot.site },
            "destination slot's lease ran out and its site is full: request sent back to wait",
          );
        }
        return r !== "full";
      } catch (err) {
        warn(
          { err: (err as Error).message },
          "could not check a destination slot in Redis; requests that arrive late are sent back",
        );
        return false;
      }
    },
    hold(slot) {
      if (!slot || !slots) return () => {};
      const timer = setInterval(
        () => {
          slots.renew(slot, now() + slot.leaseMs, now()).then(
            (r) => {
              if (r === "full") {
                log.warn(
                  { site: slot.site },
                  "destination slot lost during a transaction (its lease ran out): the site may be over its limit",
                );
              }
            },
            (err) => warn({ err: (err as Error).message }, "could not renew a destination slot in Redis"),
          );
        },
        Math.max(100, Math.floor(slot.leaseMs / 3)),
      );
      timer.unref();
      return () => clearInterval(timer);
    },
  };
}

/** `ms` ± `fraction`, so requests sent back together do not all return at the same moment. */
export function jitter(ms: number, fraction = 0.2, random: () => number = Math.random): number {
  return Math.max(1, Math.round(ms * (1 - fraction + 2 * fraction * random())));
}
