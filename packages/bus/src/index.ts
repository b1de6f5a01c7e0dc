export { type BodySource, BodyStore } from "./body-store.ts";
export {
  Bus,
  type BusOptions,
  type ConsumeOptions,
  type Handler,
  type HandlerContext,
  type Outcome,
  outcome,
  type PublishOptions,
  type Subscription,
} from "./bus.ts";
export { BodyIntegrityError, BodyNotFoundError, BusConnectError, BusError } from "./errors.ts";
export { defaultTopologySettings, type TopologySettings } from "./topology.ts";
