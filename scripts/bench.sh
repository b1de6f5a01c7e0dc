#!/usr/bin/env bash
# `npm run bench -- inbound|relay [--messages N] [--sessions S] [--size BYTES]`: throughput with
# Postfix's smtp-source (and smtp-sink), installed from Debian's postfix package when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh smtp-source
exec node scripts/bench.ts "$@"
