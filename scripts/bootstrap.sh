#!/usr/bin/env bash
# Shared set-up for `npm start`, `npm test` and .ci/run: Node 24, pnpm, the workspace's
# dependencies, and the servers the pipeline runs on (nats-server, redis-server).
# Source it (`. scripts/bootstrap.sh [extra-debian-packages...]`); it exports PATH.
# Idempotent and quiet when everything is already there.

NODE_VERSION=24.21.0
PNPM_VERSION=11.28.11 # keep equal to "packageManager" in package.json

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mailpipe}"
export TURBO_TELEMETRY_DISABLED=1
export npm_config_update_notifier=false

say() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }

if [ "$(node_major)" -lt 24 ]; then
  NODE_DIR="$TOOLS/node-$NODE_VERSION"
  if [ ! -x "$NODE_DIR/bin/node" ]; then
    command -v npm >/dev/null || die "npm is needed to install Node $NODE_VERSION; install Node.js and npm first"
    case "$(uname -m)" in
      x86_64) arch=x64 ;;
      aarch64 | arm64) arch=arm64 ;;
      *) die "unsupported CPU $(uname -m): install Node.js >= 24 yourself" ;;
    esac
    say "installing Node $NODE_VERSION into $NODE_DIR (the machine has $(node -v 2>/dev/null || echo none))"
    rm -rf "$NODE_DIR.tmp"
    npm install -g --prefix "$NODE_DIR.tmp" --no-audit --no-fund --loglevel=error "node-linux-$arch@$NODE_VERSION" >&2 ||
      die "could not install node-linux-$arch@$NODE_VERSION from the npm registry"
    rm -rf "$NODE_DIR" && mv "$NODE_DIR.tmp" "$NODE_DIR"
  fi
  export PATH="$NODE_DIR/bin:$PATH"
  hash -r
fi

PNPM_DIR="$TOOLS/pnpm-$PNPM_VERSION"
if [ "$(pnpm -v 2>/dev/null || true)" != "$PNPM_VERSION" ]; then
  if [ ! -x "$PNPM_DIR/bin/pnpm" ]; then
    say "installing pnpm $PNPM_VERSION into $PNPM_DIR"
    rm -rf "$PNPM_DIR.tmp"
    npm install -g --prefix "$PNPM_DIR.tmp" --no-audit --no-fund --loglevel=error "pnpm@$PNPM_VERSION" >&2 ||
      die "could not install pnpm@$PNPM_VERSION"
    rm -rf "$PNPM_DIR" && mv "$PNPM_DIR.tmp" "$PNPM_DIR"
  fi
  export PATH="$PNPM_DIR/bin:$PATH"
  hash -r
fi

# Dependencies: reinstall only when the lockfile changed since the last install.
stamp="$ROOT/node_modules/.bootstrap-lock"
if [ ! -f "$stamp" ] || ! cmp -s "$ROOT/pnpm-lock.yaml" "$stamp"; then
  say "installing dependencies (pnpm install --frozen-lockfile)"
  (cd "$ROOT" && pnpm install --frozen-lockfile --reporter=append-only >&2) || die "pnpm install failed"
  cp "$ROOT/pnpm-lock.yaml" "$stamp"
fi

# Servers and tools from Debian's packages: command -> package.
need_debs=()
# swaks needs Net::SSLeay for --tls, which apt leaves out with --no-install-recommends
# unbound: the validating resolver of the DNSSEC tests (packages/testing/src/unbound.ts), which sign
# their test zones with ldnsutils' ldns-keygen and ldns-signzone
declare -A deb_of=([dovecot]=dovecot-core [nats-server]=nats-server [redis-server]=redis-server [swaks]="swaks libnet-ssleay-perl" [smtp-source]=postfix [openssl]=openssl [unbound]=unbound [ldns-keygen]=ldnsutils [ldns-signzone]=ldnsutils)
for cmd in nats-server redis-server openssl "$@"; do
  # shellcheck disable=SC2206 # a value may name several packages
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need_debs+=(${deb_of[$cmd]:-$cmd})
done
case " $* " in
  *" swaks "*) perl -MNet::SSLeay -e 1 2>/dev/null || need_debs+=(libnet-ssleay-perl) ;;
esac
# `dovecot`: the LMTP, IMAP and Sieve parts the mda tests start (packages/testing/src/dovecot.ts)
case " $* " in
  *" dovecot "*)
    [ -x /usr/lib/dovecot/lmtp ] || need_debs+=(dovecot-lmtpd)
    [ -x /usr/lib/dovecot/imap ] || need_debs+=(dovecot-imapd)
    [ -e /usr/lib/dovecot/modules/lib90_sieve_plugin.so ] || need_debs+=(dovecot-sieve)
    ;;
esac
if ((${#need_debs[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${need_debs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if printf '%s\n' "${need_debs[@]}" | grep -qx postfix; then
      echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    fi
    # the packages' own services (dovecot…) must not start: the tests run their own on loopback
    no_start=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && no_start=1
    fi
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_debs[@]}"; } >&2
    apt_status=$?
    [ -n "$no_start" ] && rm -f /usr/sbin/policy-rc.d
    [ "$apt_status" -eq 0 ] || die "apt-get install ${need_debs[*]} failed"
  else
    die "missing: ${need_debs[*]}. Install them (Debian/Ubuntu: sudo apt-get install ${need_debs[*]}) and run again"
  fi
fi
# smtp-source lives in /usr/sbin, which a non-login PATH may lack
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin" ;; esac
