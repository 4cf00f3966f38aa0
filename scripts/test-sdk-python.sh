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
python3 -c 'import sys; assert sys.version_info >= (3, 10), "the SDK needs Python 3.10 or newer"'
python="$(./scripts/python-env.sh "$sdk/requirements-test.txt" \
  "${REALM_SDK_PY_ENV:-$HOME/.cache/realm/sdk-python-env}" "$sdk")"

cd "$sdk"
echo "==> Python SDK tests (sdks/python)" >&2
PYTHONDONTWRITEBYTECODE=1 exec "$python" -m pytest -p no:cacheprovider "$@"
