export {
  type BaseConfig,
  baseConfig,
  bool,
  byteSize,
  ConfigError,
  duration,
  durationList,
  hostList,
  isSecret,
  parseConfig,
  parseDuration,
  port,
  redactConfig,
} from "./config.ts";
export { type HealthServer, startHealthServer } from "./http.ts";
export { mapLimit } from "./map-limit.ts";
export { createRedis, type RedisConfig, redisConfig } from "./redis.ts";
export {
  type RunningService,
  runService,
  type ServiceContext,
  type ServiceDefinition,
  type StopFn,
} from "./run-service.ts";
