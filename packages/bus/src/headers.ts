import type { MsgHdrs } from "@nats-io/transport-node";
import type { TextMapGetter, TextMapSetter } from "@opentelemetry/api";

export const natsHeaderSetter: TextMapSetter<MsgHdrs> = {
  set(carrier, key, value) {
    carrier.set(key, value);
  },
};

export const natsHeaderGetter: TextMapGetter<MsgHdrs | undefined> = {
  keys(carrier) {
    return carrier ? carrier.keys() : [];
  },
  get(carrier, key) {
    if (!carrier) return undefined;
    const v = carrier.get(key);
    return v === "" ? undefined : v;
  },
};
