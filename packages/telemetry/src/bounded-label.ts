/** The label value every value past a bounded label's limit shares. */
export const OTHER_LABEL = "other";

/**
 * The first `max` distinct values keep their own label value and later ones share `other`: a
 * label per recipient domain (or destination site) would add a time series per value ever seen,
 * for the life of the process (and of every Prometheus that scrapes it).
 */
export function boundedLabel(max: number): (value: string) => string {
  const seen = new Set<string>();
  return (value) => {
    if (seen.has(value)) return value;
    if (seen.size >= max) return OTHER_LABEL;
    seen.add(value);
    return value;
  };
}
