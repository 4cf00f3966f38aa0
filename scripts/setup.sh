#!/usr/bin/env bash
# Installs what Realm's build and tests need beyond cargo: the wasm32-wasip2
# target for guest components, and from Debian (as root) PostgreSQL's server
# binaries (the control plane's tests start their own throwaway cluster),
# Chromium with its WebDriver (the dashboard's browser test), and
# redis-server and HAProxy (the fleet's tests). Safe to run again; does
# nothing when all is present.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install Rust from https://rustup.rs" >&2
  exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "==> installing the wasm32-wasip2 target (guest components)" >&2
  rustup target add wasm32-wasip2
fi

# Debian packages the tests need: PostgreSQL (initdb, pg_ctl), openssl (a
# throwaway authority for the TLS test) and Chromium with chromium-driver.
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing+=(postgresql)
command -v openssl >/dev/null || missing+=(openssl)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# The fleet's tests: shared limits in Redis, HAProxy in front of three hosts.
command -v redis-server >/dev/null || missing+=(redis-server)
command -v haproxy >/dev/null || missing+=(haproxy)
# promtool (Debian's prometheus package) checks the alert rules.
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing ${missing[*]} from Debian (the control plane's and fleet's tests)" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: ${missing[*]} missing; the PostgreSQL, browser and fleet tests need them (apt-get install ${missing[*]})" >&2
  fi
fi
