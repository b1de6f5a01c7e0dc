#!/usr/bin/env bash
# `npm test`: sets up what the tests need (Node 24, pnpm, dependencies, nats-server, redis-server,
# swaks, Dovecot, rspamd, unbound and ldnsutils), then runs the whole suite with vitest: lint and
# type check are tests in it too (tests/static), so one report counts everything. Extra arguments go
# to vitest.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh swaks smtp-source dovecot rspamd unbound ldns-keygen ldns-signzone
args=(run)
if [ -n "${VITEST_JSON_REPORT:-}" ]; then
  args+=(--reporter=default --reporter=json "--outputFile.json=$VITEST_JSON_REPORT")
fi
exec node_modules/.bin/vitest "${args[@]}" "$@"
