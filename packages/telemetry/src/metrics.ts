import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";

export type { Counter, Gauge, Histogram } from "prom-client";

/** A Prometheus registry for one service. Metric names get the `mailpipe_` prefix. */
export class Metrics {
  readonly registry = new Registry();
  readonly #made = new Map<string, Counter | Gauge | Histogram>();

  constructor(service: string, { defaults = true }: { defaults?: boolean } = {}) {
    this.registry.setDefaultLabels({ service });
    if (defaults) collectDefaultMetrics({ register: this.registry, prefix: "mailpipe_" });
  }

  counter<L extends string>(name: string, help: string, labelNames: readonly L[] = []): Counter<L> {
    return this.#get(
      name,
      () => new Counter({ name: `mailpipe_${name}`, help, labelNames, registers: [this.registry] }),
    );
  }

  gauge<L extends string>(
    name: string,
    help: string,
    labelNames: readonly L[] = [],
    collect?: (this: Gauge<L>) => void | Promise<void>,
  ): Gauge<L> {
    return this.#get(
      name,
      () =>
        new Gauge({
          name: `mailpipe_${name}`,
          help,
          labelNames,
          registers: [this.registry],
          ...(collect ? { collect } : {}),
        }),
    );
  }

  histogram<L extends string>(
    name: string,
    help: string,
    labelNames: readonly L[] = [],
    buckets: number[] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600],
  ): Histogram<L> {
    return this.#get(
      name,
      () =>
        new Histogram({ name: `mailpipe_${name}`, help, labelNames, buckets, registers: [this.registry] }),
    );
  }

  #get<M extends Counter | Gauge | Histogram>(name: string, make: () => M): M {
    let m = this.#made.get(name);
    if (!m) {
      m = make();
      this.#made.set(name, m);
    }
    return m as M;
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
