#!/usr/bin/env bash
# Prints the path of a Python interpreter with a requirements file's packages
# (and optionally a local package, installed editable) installed, creating or
# rebuilding its virtual environment first.
#
#   scripts/python-env.sh [REQUIREMENTS [ENV_DIR [PACKAGE_DIR]]]
#
# Defaults: the test suite's tests/python/requirements.txt in $REALM_PY_ENV
# (default ~/.cache/realm/py-env). Environments live outside the checkout and
# are rebuilt when the requirements, the package's pyproject.toml or its
# location change. Progress goes to stderr; stdout is only the path.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="$(realpath "${1:-tests/python/requirements.txt}")"
env_dir="${2:-${REALM_PY_ENV:-$HOME/.cache/realm/py-env}}"
package="${3:+$(realpath "$3")}"
stamp="$env_dir/.requirements.sha256"
want="$( (cat "$requirements"; [ -z "$package" ] || { echo "$package"; cat "$package/pyproject.toml"; }) \
  | sha256sum | cut -d' ' -f1)"

if [ ! -x "$env_dir/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> preparing the Python environment $env_dir ($requirements${package:+, $package})" >&2
  # One writer at a time: concurrent test binaries or builds may ask at once.
  mkdir -p "$(dirname "$env_dir")"
  exec 9>"$env_dir.lock"
  flock 9
  if [ ! -x "$env_dir/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$env_dir"
    python3 -m venv "$env_dir" >&2
    "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check \
      -r "$requirements" ${package:+-e "$package"} >&2
    echo "$want" >"$stamp"
  fi
fi
echo "$env_dir/bin/python"
