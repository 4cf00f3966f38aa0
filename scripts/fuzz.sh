#!/usr/bin/env bash
# Coverage-guided fuzzing of Realm's parsers: cargo-fuzz (libFuzzer, with
# AddressSanitizer) on the nightly toolchain, both installed when missing.
#
#   scripts/fuzz.sh [--short] [--seconds N] [TARGET...]
#
# Targets (fuzz/fuzz_targets/): gguf, tokenizer, chat_template,
# pipeline_toml, ws_frame, openai_body; all by default. Each starts from its
# committed seeds (fuzz/corpus/TARGET) and past crashes
# (fuzz/regressions/TARGET, replayed every run), fuzzes for N seconds
# (default 300; --short: 20, as CI runs it) and keeps what it learns in
# ~/.cache/realm/fuzz-corpus/TARGET. A crash stops the run: its input is
# written to fuzz/artifacts/TARGET/; commit it under fuzz/regressions/TARGET
# with the fix. Prints executions per target at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=300
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --short) seconds=20 ;;
    --seconds) seconds="$2"; shift ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=(gguf tokenizer chat_template pipeline_toml ws_frame openai_body)

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "==> installing the nightly toolchain (cargo-fuzz needs it)" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz" >&2
  cargo +nightly install cargo-fuzz --version 0.13.2 --locked
fi
# Instrumented builds live apart from the normal ones (other flags).
export CARGO_TARGET_DIR="${REALM_FUZZ_TARGET_DIR:-$HOME/.cache/realm/fuzz-target}"
cache="${REALM_FUZZ_CORPUS:-$HOME/.cache/realm/fuzz-corpus}"

summary=()
for target in "${targets[@]}"; do
  mkdir -p "$cache/$target" "fuzz/artifacts/$target"
  corpora=("$cache/$target" "fuzz/corpus/$target")
  [ -d "fuzz/regressions/$target" ] && corpora+=("fuzz/regressions/$target")
  echo "==> fuzzing $target for ${seconds}s" >&2
  log="$(mktemp)"
  if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" "${corpora[@]}" -- \
        -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=4096 \
        -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 2>&1 | tee "$log" >&2; then
    echo "fuzz target $target failed; its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  runs="$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)"
  summary+=("$target: ${runs:-?} executions in ${seconds}s, no crash")
  rm -f "$log"
done
echo "==> fuzz summary"
printf '  %s\n' "${summary[@]}"
