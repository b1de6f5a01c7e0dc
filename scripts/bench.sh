#!/usr/bin/env bash
# `npm run bench -- inbound|relay [--messages N] [--sessions S] [--size BYTES]`, or
# `npm run bench -- compare inbound|relay [...]` (Postfix side by side, scripts/bench/compare.ts), or
# `npm run bench -- scale [...]` (delivery replicas 1, 2, 4, scripts/bench/scale.ts), or
# `npm run bench -- track [...]` (mailctl track at 1,000,000 events, scripts/bench/track.ts): throughput with
# Postfix's smtp-source (and smtp-sink), installed from Debian's postfix package when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh smtp-source
if [ "${1:-}" = scale ]; then
  shift
  exec node scripts/bench/scale.ts "$@"
fi
if [ "${1:-}" = track ]; then
  shift
  exec node scripts/bench/track.ts "$@"
fi
if [ "${1:-}" = compare ]; then
  shift
  exec node scripts/bench/compare.ts "$@"
fi
exec node scripts/bench.ts "$@"
