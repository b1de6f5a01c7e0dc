#!/usr/bin/env bash
# `npm start`: sets up Node 24, pnpm, the dependencies, nats-server, redis-server and swaks when
# missing, then runs the whole pipeline on loopback (scripts/dev.ts). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh swaks
exec node scripts/dev.ts "$@"
