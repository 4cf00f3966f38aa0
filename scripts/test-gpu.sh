#!/usr/bin/env bash
# Runs the engine's tests on Burn's wgpu backend (the `gpu` feature): the
# tiny-model GPU-vs-CPU test and the llama.cpp reference tests on the real
# models, on whatever Vulkan device is present. Without a GPU that is Mesa's
# software driver lavapipe, installed here from Debian when missing (as root),
# so the GPU path is tested on every CI run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing Mesa's Vulkan drivers (lavapipe) and the Vulkan loader" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    echo "error: no Vulkan driver; install mesa-vulkan-drivers and libvulkan1" >&2
    exit 1
  fi
fi
# Mesa warns when this is unset; the warning is harmless but noisy.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
REALM_TEST_DEVICE=gpu cargo test -p realm-models --features gpu "$@"
