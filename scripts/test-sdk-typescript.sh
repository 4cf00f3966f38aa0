#!/usr/bin/env bash
# Builds the TypeScript SDK (sdks/typescript) and runs its tests, which start a
# real `realm-host serve`. Needs Node >= 20 and npm, a built realm-host
# ($REALM_HOST_BIN, default ${CARGO_TARGET_DIR:-target}/debug/realm-host), the
# Rust guests (guests/rust/target/wasm32-wasip2/release/*.wasm, built by
# `cargo test`) and the model ($REALM_TEST_MODEL, default
# ~/.realm/models/smollm2-135m-instruct.gguf). Extra arguments go to
# `node --test` (e.g. --test-name-pattern=cancel).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
sdk="$repo/sdks/typescript"

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "test-sdk-typescript: $tool is not installed (Node >= 20 is required)" >&2
    exit 1
  fi
done
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if (( node_major < 20 )); then
  echo "test-sdk-typescript: Node >= 20 is required (found $(node --version))" >&2
  exit 1
fi

# Paths given relative to where we were called from stay valid after the cd.
if [[ -n "${REALM_HOST_BIN:-}" ]]; then
  REALM_HOST_BIN="$(realpath -m -- "$REALM_HOST_BIN")"
else
  target="${CARGO_TARGET_DIR:-$repo/target}"
  [[ "$target" = /* ]] || target="$repo/$target"
  REALM_HOST_BIN="$target/debug/realm-host"
fi
export REALM_HOST_BIN
if [[ ! -x "$REALM_HOST_BIN" ]]; then
  echo "test-sdk-typescript: no realm-host at $REALM_HOST_BIN (cargo build -p realm-host, or set REALM_HOST_BIN)" >&2
  exit 1
fi
if [[ -n "${REALM_TEST_MODEL:-}" ]]; then
  REALM_TEST_MODEL="$(realpath -m -- "$REALM_TEST_MODEL")"
  export REALM_TEST_MODEL
fi

cd "$sdk"

# Install exactly the lock file's packages, unless node_modules already holds them.
lock_hash="$(sha256sum package-lock.json | cut -d' ' -f1)"
stamp="node_modules/.realm-package-lock.sha256"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$lock_hash" ]]; then
  npm ci --no-audit --no-fund
  echo "$lock_hash" >"$stamp"
fi

npm run --silent build
node --test --test-concurrency=1 "$@" build/test/*.test.js
