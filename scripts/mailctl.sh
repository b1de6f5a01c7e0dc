#!/usr/bin/env bash
# `npm run mailctl -- <command>`: the operator CLI with the project's own Node, pointed at the
# `npm start` development pipeline unless DIRECTORY_FILE / NATS_URL / REDIS_URL say otherwise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
args=("$@")
set -- # a sourced script sees the caller's arguments: give bootstrap none
. "$root/scripts/bootstrap.sh" >&2
data="${MAILPIPE_DATA_DIR:-$root/.data}"
export DIRECTORY_FILE="${DIRECTORY_FILE:-$data/directory.yaml}"
export NATS_URL="${NATS_URL:-nats://127.0.0.1:${DEV_NATS_PORT:-14222}}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:${DEV_REDIS_PORT:-16379}}"
exec node "$root/packages/mailctl/src/main.ts" "${args[@]}"
