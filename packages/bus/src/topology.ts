import { type ConsumerKey, type StreamKey, topology } from "@mailpipe/contracts";
import {
  AckPolicy,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiError,
  type JetStreamManager,
  RetentionPolicy,
  StorageType,
  type StreamConfig,
} from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import { BusError } from "./errors.ts";

export interface TopologySettings {
  /** stream replicas (3 in a clustered production deployment) */
  replicas: number;
  /** how long the events stream keeps events */
  eventsMaxAgeMs: number;
  /** window in which a repeated Nats-Msg-Id is stored once */
  duplicateWindowMs: number;
  /** backstop TTL of stored bodies; longer than the queue lifetime */
  bodyTtlMs: number;
}

export const defaultTopologySettings: TopologySettings = {
  replicas: 1,
  eventsMaxAgeMs: 7 * 24 * 3600_000,
  duplicateWindowMs: 2 * 60_000,
  bodyTtlMs: 7 * 24 * 3600_000,
};

const STREAM_NOT_FOUND = 10059;
const STREAM_NAME_IN_USE = 10058;
const CONSUMER_NOT_FOUND = 10014;

function isApiError(err: unknown, code: number): boolean {
  return err instanceof JetStreamApiError && err.code === code;
}

/** "JetStream system temporarily unavailable": a clustered asset without a leader for a moment. */
const TEMPORARILY_UNAVAILABLE = 10008;

/**
 * Whether JetStream may answer the same request a moment later: no leader yet (after a node loss,
 * or while a stream or consumer gains replicas), or an API request that timed out meanwhile.
 */
export function isTransient(err: unknown): boolean {
  const e = err instanceof BusError && err.cause ? err.cause : err;
  if (e instanceof JetStreamApiError) return e.code === TEMPORARILY_UNAVAILABLE || e.status === 503;
  return e instanceof Error && e.name === "TimeoutError";
}

/**
 * Runs a JetStream management step again while it fails transiently, for up to `forMs`; other
 * errors, and the last transient one, are thrown as they are.
 */
export async function whileUnavailable<T>(
  step: () => Promise<T>,
  { forMs = 30_000, firstPauseMs = 250 }: { forMs?: number; firstPauseMs?: number } = {},
): Promise<T> {
  const until = Date.now() + forMs;
  for (let pause = firstPauseMs; ; pause = Math.min(pause * 2, 2000)) {
    try {
      return await step();
    } catch (err) {
      if (!isTransient(err) || Date.now() + pause > until) throw err;
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  }
}

type StreamDef = { name: string; subjects: readonly string[]; kind: "workqueue" | "limits" | "spool" };

function streamConfig(def: StreamDef, s: TopologySettings): Partial<StreamConfig> & { name: string } {
  const workqueue = def.kind === "workqueue";
  const spool = def.kind === "spool";
  return {
    name: def.name,
    subjects: [...def.subjects],
    retention: workqueue ? RetentionPolicy.Workqueue : RetentionPolicy.Limits,
    storage: StorageType.File,
    num_replicas: s.replicas,
    // the spool never drops a stored message to make room: a full spool refuses new ones (451)
    discard: spool ? DiscardPolicy.New : DiscardPolicy.Old,
    duplicate_window: nanos(s.duplicateWindowMs),
    // spool messages are deleted when final; BODY_TTL is the backstop, as for the body bucket
    max_age: workqueue ? 0 : nanos(spool ? s.bodyTtlMs : s.eventsMaxAgeMs),
    max_msg_size: 1024 * 1024,
    allow_direct: true,
  };
}

/**
 * Creates or updates one stream; safe to run from every replica at once. A stream with fewer
 * replicas than `s.replicas` is raised to it (JetStream copies the data to the new peers); one
 * with more is kept as it is, and the returned notes say so (for the log).
 */
export function ensureStream(jsm: JetStreamManager, key: StreamKey, s: TopologySettings): Promise<string[]> {
  return whileUnavailable(() => ensureStreamOnce(jsm, key, s));
}

async function ensureStreamOnce(
  jsm: JetStreamManager,
  key: StreamKey,
  s: TopologySettings,
): Promise<string[]> {
  const want = streamConfig(topology.streams[key], s);
  for (let round = 0; round < 3; round++) {
    let have: StreamConfig | null = null;
    try {
      have = (await jsm.streams.info(want.name)).config;
    } catch (err) {
      if (!isApiError(err, STREAM_NOT_FOUND)) throw err;
    }
    if (!have) {
      try {
        await jsm.streams.add(want);
        return [];
      } catch (err) {
        if (isApiError(err, STREAM_NAME_IN_USE)) continue; // another replica won the race
        throw new BusError(
          `creating stream ${want.name} failed: ${(err as Error).message}${replicasHint(s.replicas)}`,
          { cause: err },
        );
      }
    }
    if (have.retention !== want.retention) {
      throw new BusError(
        `stream ${want.name} exists with retention ${have.retention}, expected ${want.retention}; ` +
          "it cannot be changed in place: drain it and delete it (nats stream rm) to let the services recreate it",
      );
    }
    // Replicas only ever go up here: a replica started with a lower JS_REPLICAS (a default left
    // in place) must not take a production stream's copies away. Lowering is the operator's call.
    const replicas = Math.max(have.num_replicas, s.replicas);
    const notes: string[] = [];
    if (have.num_replicas > s.replicas) {
      notes.push(
        `stream ${want.name} has ${have.num_replicas} replicas and JS_REPLICAS is ${s.replicas}: ` +
          `kept at ${have.num_replicas}; set JS_REPLICAS=${have.num_replicas} on every service, or lower the stream ` +
          `yourself (nats stream edit ${want.name} --replicas ${s.replicas})`,
      );
    }
    const drift =
      JSON.stringify([...have.subjects].sort()) !== JSON.stringify([...(want.subjects ?? [])].sort()) ||
      have.max_age !== want.max_age ||
      have.duplicate_window !== want.duplicate_window ||
      have.num_replicas !== replicas;
    if (drift) {
      try {
        await jsm.streams.update(want.name, { ...have, ...want, num_replicas: replicas } as StreamConfig);
      } catch (err) {
        throw new BusError(
          `updating stream ${want.name} (replicas ${have.num_replicas} → ${replicas}) failed: ` +
            `${(err as Error).message}${replicasHint(s.replicas)}`,
          { cause: err },
        );
      }
    }
    return notes;
  }
  return [];
}

/** What to do when JetStream refuses the replica count JS_REPLICAS asks for. */
export function replicasHint(replicas: number): string {
  return replicas > 1
    ? `; JS_REPLICAS=${replicas} needs a JetStream cluster with at least ${replicas} nodes up: ` +
        "start the nodes (or wait for them), or set JS_REPLICAS to the number of nodes"
    : "";
}

export interface ConsumerSettings {
  ackWaitMs: number;
  maxAckPending: number;
  /** consumer replicas (JS_REPLICAS); never more than the stream has */
  replicas?: number;
}

/**
 * Creates or updates a durable pull consumer from the design's table. A cluster that has no leader
 * for it for a moment (a node lost, replicas being raised) is asked again, for up to 30 s.
 */
export function ensureConsumer(
  jsm: JetStreamManager,
  key: ConsumerKey,
  settings: ConsumerSettings,
): Promise<{ stream: string; durable: string }> {
  return whileUnavailable(() => ensureConsumerOnce(jsm, key, settings));
}

async function ensureConsumerOnce(
  jsm: JetStreamManager,
  key: ConsumerKey,
  { ackWaitMs, maxAckPending, replicas = 1 }: ConsumerSettings,
): Promise<{ stream: string; durable: string }> {
  const def = topology.consumers[key];
  // a consumer cannot have more replicas than its stream (an old stream kept only to be drained)
  const streamReplicas = (await jsm.streams.info(def.stream)).config.num_replicas;
  const numReplicas = Math.min(replicas, streamReplicas);
  const config = {
    num_replicas: numReplicas,
    durable_name: def.durable,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    filter_subject: def.filter,
    ack_wait: nanos(ackWaitMs),
    max_ack_pending: maxAckPending,
    max_deliver: -1,
  };
  try {
    const info = await jsm.consumers.info(def.stream, def.durable);
    const c = info.config;
    // 0 means "as many as the stream" (consumers made before replicas were set explicitly)
    const have = c.num_replicas || streamReplicas;
    if (
      c.ack_wait !== config.ack_wait ||
      c.max_ack_pending !== config.max_ack_pending ||
      c.filter_subject !== config.filter_subject ||
      have < numReplicas
    ) {
      await jsm.consumers.update(def.stream, def.durable, {
        ack_wait: config.ack_wait,
        max_ack_pending: config.max_ack_pending,
        filter_subject: config.filter_subject,
        ...(have < numReplicas ? { num_replicas: numReplicas } : {}),
      });
    }
  } catch (err) {
    if (!isApiError(err, CONSUMER_NOT_FOUND)) throw err;
    await jsm.consumers.add(def.stream, config);
  }
  return { stream: def.stream, durable: def.durable };
}
