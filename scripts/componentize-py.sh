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
. "$(dirname "$0")/lib/atomic-output.sh"
run_with_atomic_output -o --output "$(dirname "$python")/componentize-py" "$@"
