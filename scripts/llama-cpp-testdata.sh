#!/usr/bin/env bash
# Prints the path of llama.cpp's test data (its vocab-only GGUF files with
# tokenizer test vectors, `ggml-vocab-*.gguf{,.inp,.out}`, and its collection
# of real chat templates, `templates/*.jinja`), fetching it first if needed.
#
#   scripts/llama-cpp-testdata.sh
#
# The data comes from the source distribution of llama-cpp-python (pinned
# below, the version the benchmarks and reference logits use), found through
# PyPI's simple index and checked against the sha256 the index gives. It is
# unpacked into $REALM_LLAMA_CPP_DATA (default
# ~/.cache/realm/llama-cpp-<version>), outside git. Progress goes to stderr;
# stdout is only the path.
set -euo pipefail
version=0.3.36
dest="${REALM_LLAMA_CPP_DATA:-$HOME/.cache/realm/llama-cpp-$version}"
if [ -f "$dest/.complete" ]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$(dirname "$dest")"
exec 9>"$dest.lock"
flock 9
if [ ! -f "$dest/.complete" ]; then
  echo "==> fetching llama.cpp's test data (llama-cpp-python $version sdist, 77 MB)" >&2
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  python3 - "$version" "$work/sdist.tar.gz" <<'EOF'
import hashlib, json, sys, urllib.request

version, out = sys.argv[1], sys.argv[2]
index = urllib.request.Request(
    "https://pypi.org/simple/llama-cpp-python/",
    headers={"Accept": "application/vnd.pypi.simple.v1+json"},
)
files = json.load(urllib.request.urlopen(index, timeout=60))["files"]
name = f"llama_cpp_python-{version}.tar.gz"
entry = next((f for f in files if f["filename"] == name), None)
if entry is None:
    sys.exit(f"{name} is not on PyPI's index")
digest = hashlib.sha256()
with urllib.request.urlopen(entry["url"], timeout=60) as response, open(out, "wb") as file:
    while chunk := response.read(1 << 20):
        digest.update(chunk)
        file.write(chunk)
want = entry["hashes"]["sha256"]
if digest.hexdigest() != want:
    sys.exit(f"{name}: sha256 {digest.hexdigest()}, the index says {want}")
EOF
  root="llama_cpp_python-$version/vendor/llama.cpp/models"
  tar -xzf "$work/sdist.tar.gz" -C "$work" --wildcards "$root/ggml-vocab-*" "$root/templates/*"
  rm -rf "$dest"
  mv "$work/$root" "$dest"
  touch "$dest/.complete"
fi
echo "$dest"
