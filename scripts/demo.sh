#!/usr/bin/env bash
# Builds realm-host and runs the demo pipeline on this README: the guest
# components are built on first use by the pipeline itself.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo run --release --quiet -p realm-host -- run pipelines/text-report.toml --input text=@README.md "$@"
