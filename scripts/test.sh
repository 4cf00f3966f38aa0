#!/usr/bin/env bash
# Runs every test: host unit tests, the abuse suite, pipeline and CLI
# end-to-end tests (which build the guest components themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --workspace "$@"
