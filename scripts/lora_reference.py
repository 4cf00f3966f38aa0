"""llama.cpp's logits for random LoRA adapters on the real models, as the
reference `models/tests/lora.rs` checks Realm against.

    python scripts/lora_reference.py ADAPTERS_DIR OUT_JSON

ADAPTERS_DIR holds the `.gguf` adapters and `prompt.txt` that the test's
ignored `write_real_adapters` wrote (and in `bases/`, the models' copies
dequantized to F32), each adapter with a JSON sidecar naming its base
model's file and name and its scale. Each adapter is recorded
as `scripts/arch_reference.py` records a model (every prompt position's top
tokens and probes, then a greedy continuation), with llama.cpp running the
base with the adapter (`lora_path`, `lora_scale`); each base model is
recorded once without one, under its store name, so the test can compare
what the adapter changes in each engine.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from arch_reference import reference  # noqa: E402


def main() -> None:
    adapters, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    prompt = (adapters / "prompt.txt").read_text()
    result = {}
    for path in sorted(adapters.glob("*.gguf")):
        sidecar = json.loads(path.with_suffix(".json").read_text())
        base = pathlib.Path(sidecar["base"])
        if sidecar["base_name"] not in result:
            print(f"==> {sidecar['base_name']}", file=sys.stderr)
            entry = reference(base, prompt)
            del entry["digest"]  # the model is checked by its own tests
            result[sidecar["base_name"]] = entry
        print(f"==> {path.stem}", file=sys.stderr)
        result[path.stem] = reference(base, prompt, path, sidecar["scale"])
    out.write_text(json.dumps(result, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
