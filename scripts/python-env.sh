#!/usr/bin/env bash
# Prints the path of a Python interpreter with the test suite's packages
# (tests/python/requirements.txt) installed, creating or updating the virtual
# environment first. The environment lives outside the checkout, in
# $REALM_PY_ENV (default ~/.cache/realm/py-env), and is rebuilt when the
# requirements change. Progress goes to stderr; stdout is only the path.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="$PWD/tests/python/requirements.txt"
env_dir="${REALM_PY_ENV:-$HOME/.cache/realm/py-env}"
stamp="$env_dir/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"

if [ ! -x "$env_dir/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> preparing the Python test environment in $env_dir" >&2
  # One writer at a time: concurrent test binaries may ask at once.
  mkdir -p "$(dirname "$env_dir")"
  exec 9>"$env_dir.lock"
  flock 9
  if [ ! -x "$env_dir/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python3 -m venv "$env_dir" >&2
    "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check \
      -r "$requirements" >&2
    echo "$want" >"$stamp"
  fi
fi
echo "$env_dir/bin/python"
