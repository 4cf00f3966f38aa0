#!/usr/bin/env bash
# Runs jco (the version pinned in guests/js/package-lock.json), installing the
# JavaScript guest toolchain into guests/js/node_modules first when it is
# missing or older than the lock file. Arguments go to jco unchanged, e.g. in a
# guest's directory:
#
#   ../../../scripts/jco.sh componentize app.js --wit ../../../wit --world-name step \
#     --backend quickjs -o target/app.wasm
#
# The output's directory is created first, and the output replaced atomically.
set -euo pipefail
js="$(cd "$(dirname "$0")/../guests/js" && pwd)"
stamp="$js/node_modules/.realm-lock.sha256"
want="$(sha256sum "$js/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  exec 9>"$js/.npm-install.lock"
  flock 9
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> installing the JavaScript guest toolchain (npm ci in $js)" >&2
    (cd "$js" && npm ci --no-audit --no-fund >&2)
    echo "$want" >"$stamp"
  fi
fi
. "$(dirname "$0")/lib/atomic-output.sh"
run_with_atomic_output -o --out "$js/node_modules/.bin/jco" "$@"
