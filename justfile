# Realm's developer recipes. `just --list` shows them all.

# Build the example and test guest components (wasm32-wasip2).
build-guests:
    ./scripts/setup.sh
    cd guests/rust && cargo build --release --target wasm32-wasip2

# Run the demo pipeline.
demo:
    ./scripts/demo.sh

# Run every test.
test:
    ./scripts/test.sh

# The fleet test: three real hosts sharing limits in redis-server behind
# HAProxy (both from Debian, installed by scripts/setup.sh); prints its numbers.
fleet-test:
    ./scripts/setup.sh
    cargo run --quiet -p realm-host -- models pull smollm2-135m-instruct >/dev/null
    REALM_REQUIRE_MODELS=1 REALM_REQUIRE_REDIS=1 cargo test -p realm-host --test fleet -- --ignored --nocapture fleet_behind_haproxy

# Check the deployment artifacts offline (Kubernetes, Compose, HAProxy, Prometheus, Grafana).
check-deploy:
    ./scripts/check-deploy.sh

# The client SDKs' tests against a freshly built server.
test-sdks:
    cargo build -p realm-host
    REALM_HOST_BIN=${CARGO_TARGET_DIR:-target}/debug/realm-host ./scripts/test-sdk-python.sh
    REALM_HOST_BIN=${CARGO_TARGET_DIR:-target}/debug/realm-host ./scripts/test-sdk-typescript.sh

# Formatting and clippy, host and guests.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cd guests/rust && cargo fmt --all -- --check && cargo clippy --target wasm32-wasip2 -- -D warnings

# Sandbox overhead: compile times and instantiate+call latency (Rust, Python, JS guests).
bench:
    cargo bench -p realm-host --bench sandbox

# The integer kernels alone, one thread: GMAC/s in cache, GB/s from memory.
bench-kernels:
    cargo bench -p realm-models --bench kernels

# Coverage-guided fuzzing (cargo-fuzz, nightly): every parser for SECONDS
# each, or only TARGETS: just fuzz 600 tokenizer gguf
fuzz SECONDS="300" *TARGETS:
    ./scripts/fuzz.sh --seconds {{SECONDS}} {{TARGETS}}

# Run a pipeline: just run pipelines/text-report.toml --input text=hi
run *ARGS:
    cargo run --release -p realm-host -- run {{ARGS}}

# Realm vs llama.cpp (llama-cpp-python), same prompts and threads, one run.
bench-vs-llamacpp *ARGS:
    python3 scripts/bench_vs_llamacpp.py {{ARGS}}

# Regenerate llama.cpp's reference logits for the tiny architecture models
# (models/tests/data/arch_reference.json) in the benchmark's llama-cpp-python.
arch-reference:
    #!/usr/bin/env bash
    set -euo pipefail
    export REALM_LLAMA_CPP_DATA="$(./scripts/llama-cpp-testdata.sh)"
    export REALM_ARCH_OUT="$(mktemp -d)"
    trap 'rm -rf "$REALM_ARCH_OUT"' EXIT
    cargo test -p realm-models --test arch_vs_llama_cpp -- --ignored write_models
    python3 -c 'import sys; sys.path.insert(0, "scripts"); import bench_vs_llamacpp as b; print(b.venv_python())' > "$REALM_ARCH_OUT/python"
    "$(cat "$REALM_ARCH_OUT/python")" scripts/arch_reference.py "$REALM_ARCH_OUT" models/tests/data/arch_reference.json

# Regenerate llama.cpp's reference logits for random LoRA adapters on the
# real models and their F32 copies (models/tests/data/lora_reference.json);
# writes about 2 GB to a temporary folder, for about 3 minutes.
lora-reference:
    #!/usr/bin/env bash
    set -euo pipefail
    export REALM_LORA_OUT="$(mktemp -d)"
    trap 'rm -rf "$REALM_LORA_OUT"' EXIT
    cargo test -p realm-models --test lora -- --ignored write_real_adapters
    python="$(python3 -c 'import sys; sys.path.insert(0, "scripts"); import bench_vs_llamacpp as b; print(b.venv_python())')"
    "$python" scripts/lora_reference.py "$REALM_LORA_OUT" models/tests/data/lora_reference.json

# Regenerate Hugging Face's renderings of real chat templates
# (models/tests/data/chat_templates.json) with Python's Jinja2.
chat-template-reference:
    #!/usr/bin/env bash
    set -euo pipefail
    data="$(./scripts/llama-cpp-testdata.sh)"
    python="$(./scripts/python-env.sh scripts/requirements-reference.txt "$HOME/.cache/realm/reference-env")"
    "$python" scripts/chat_template_reference.py "$data/templates" models/tests/data/chat_templates.json

# Strict JSON schemas through the official openai client on SmolLM2:
# 50 prompts x 5 schemas, every reply validated by Python's jsonschema, and
# the same prompts without the schema enforced for contrast (the test suite
# runs 10 x 5, constrained only).
structured-output:
    REALM_SO_PROMPTS=50 REALM_SO_CONTRAST=1 cargo test --release -p realm-host --test serve strict_json_schemas -- --nocapture
