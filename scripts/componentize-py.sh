#!/usr/bin/env bash
# Runs componentize-py (the version pinned in guests/python/requirements.txt),
# installing it first into ~/.cache/realm/componentize-py-env. Arguments go to
# componentize-py unchanged, e.g. in a guest's directory:
#
#   ../../../scripts/componentize-py.sh -d ../../../wit -w step componentize app -o target/app.wasm
#
# The output's directory is created first, and the output replaced atomically.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$("$root/scripts/python-env.sh" "$root/guests/python/requirements.txt" \
  "${REALM_COMPONENTIZE_PY_ENV:-$HOME/.cache/realm/componentize-py-env}")"
# Build into a temporary file and rename it into place, so a build running
# at the same time (two test binaries, say) never sees a half-written file.
args=("$@")
out=""
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = "-o" ] || [ "${args[$i]}" = "--output" ]; then
    out="${args[$((i + 1))]:-}"
    [ -n "$out" ] || { echo "$(basename "$0"): ${args[$i]} needs a file" >&2; exit 2; }
    mkdir -p "$(dirname "$out")"
    args[$((i + 1))]="$out.tmp.$$"
  fi
done
trap 'rm -f "$out.tmp.$$"' EXIT
"$(dirname "$python")/componentize-py" "${args[@]}"
[ -z "$out" ] || mv -f "$out.tmp.$$" "$out"
