#!/usr/bin/env bash
# Runs the Python SDK's tests (sdks/python) against a real `realm-host serve`.
#
# Prepares a virtual environment outside the checkout, in $REALM_SDK_PY_ENV
# (default ~/.cache/realm/sdk-python-env), with the pinned test requirements
# (sdks/python/requirements-test.txt) and the SDK installed in editable mode;
# it is rebuilt when the requirements, the package metadata or the checkout's
# location change. Then runs pytest; arguments go to pytest (e.g. -k reconnect).
#
# The tests need, as `cargo test` leaves them:
#   - the server binary: $REALM_HOST_BIN, default ${CARGO_TARGET_DIR:-target}/debug/realm-host
#   - the model: $REALM_TEST_MODEL, default ~/.realm/models/smollm2-135m-instruct.gguf
#   - the Rust guests: guests/rust/target/wasm32-wasip2/release/{notes,normalize,tally}.wasm
set -euo pipefail
cd "$(dirname "$0")/.."
sdk="$PWD/sdks/python"
env_dir="${REALM_SDK_PY_ENV:-$HOME/.cache/realm/sdk-python-env}"
stamp="$env_dir/.requirements.sha256"
want="$( (echo "$sdk"; cat "$sdk/requirements-test.txt" "$sdk/pyproject.toml") | sha256sum | cut -d' ' -f1)"

if [ ! -x "$env_dir/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> preparing the Python SDK's test environment in $env_dir" >&2
  mkdir -p "$(dirname "$env_dir")"
  # One writer at a time.
  exec 9>"$env_dir.lock"
  flock 9
  if [ ! -x "$env_dir/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python3 -c 'import sys; assert sys.version_info >= (3, 10), "the SDK needs Python 3.10 or newer"'
    rm -rf "$env_dir"
    python3 -m venv "$env_dir" >&2
    "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check \
      -r "$sdk/requirements-test.txt" -e "$sdk" >&2
    echo "$want" >"$stamp"
  fi
  exec 9>&-
fi

cd "$sdk"
echo "==> Python SDK tests (sdks/python)" >&2
PYTHONDONTWRITEBYTECODE=1 exec "$env_dir/bin/python" -m pytest -p no:cacheprovider "$@"
