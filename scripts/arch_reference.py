"""llama.cpp's logits for the tiny architecture models, as the reference
`models/tests/arch_vs_llama_cpp.rs` checks Realm against.

    python scripts/arch_reference.py MODELS_DIR OUT_JSON

MODELS_DIR holds the `.gguf` files and `prompt.txt` the test's ignored
`write_models` wrote. For each model, llama.cpp (llama-cpp-python, run in the
benchmark's environment) tokenizes the prompt, then evaluates it one token at
a time; at every position it records the top-1 token and its margin over the
second, and the logits of the top 8 tokens and of 24 fixed probe tokens.
Then it continues greedily for 8 tokens, recording each pick's margin. `just arch-reference` runs it all.

`MODELS_DIR/adapters` holds tiny LoRA adapters, each with a JSON sidecar
naming its base model and scale: each is recorded the same way, with
llama.cpp running the base model with the adapter (`lora_path`,
`lora_scale`), under the adapter's name.
"""

import json
import pathlib
import sys

import numpy as np
from llama_cpp import Llama

TOP = 8
PROBES = 24
GREEDY = 8


def digest(data: bytes) -> str:
    """FNV-1a 64 of the file, as the Rust test computes it."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def reference(path: pathlib.Path, prompt: str, adapter: pathlib.Path | None = None, scale: float = 1.0) -> dict:
    llm = Llama(
        model_path=str(path),
        n_ctx=256,
        n_batch=256,
        n_threads=2,
        logits_all=True,
        verbose=False,
        lora_path=str(adapter) if adapter else None,
        lora_scale=scale,
    )
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    vocab = llm.n_vocab()
    probes = [(k * 7919 + 13) % vocab for k in range(PROBES)]
    positions = []
    for i, token in enumerate(ids):
        llm.eval([token])
        logits = np.array(llm.scores[i], dtype=np.float64)
        order = np.argsort(-logits, kind="stable")
        chosen = sorted(set(order[:TOP].tolist()) | set(probes))
        positions.append(
            {
                "top": int(order[0]),
                "margin": float(logits[order[0]] - logits[order[1]]),
                "logits": [[int(t), float(logits[t])] for t in chosen],
            }
        )
    greedy, margins = [], []
    logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    for _ in range(GREEDY):
        order = np.argsort(-logits, kind="stable")
        token = int(order[0])
        greedy.append(token)
        margins.append(float(logits[order[0]] - logits[order[1]]))
        llm.eval([token])
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    return {
        "digest": digest((adapter or path).read_bytes()),
        "prompt_ids": ids,
        "positions": positions,
        "greedy_ids": greedy,
        "greedy_margins": margins,
    }


def main() -> None:
    models, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    prompt = (models / "prompt.txt").read_text()
    result = {}
    for path in sorted(models.glob("*.gguf")):
        print(f"==> {path.stem}", file=sys.stderr)
        result[path.stem] = reference(path, prompt)
    for path in sorted((models / "adapters").glob("*.gguf")):
        print(f"==> {path.stem}", file=sys.stderr)
        sidecar = json.loads(path.with_suffix(".json").read_text())
        base = models / f"{sidecar['base']}.gguf"
        result[path.stem] = reference(base, prompt, path, sidecar["scale"])
    out.write_text(json.dumps(result, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
