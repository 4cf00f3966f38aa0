#!/usr/bin/env bash
# Installs what Realm's build needs beyond cargo: the wasm32-wasip2 target for
# guest components. Safe to run again; does nothing when all is present.
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
