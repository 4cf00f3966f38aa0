#!/usr/bin/env python3
"""Realm vs llama.cpp, side by side in one run: prefill and decode tok/s and
peak RSS for each model, same prompt tokens, same thread count; then the
aggregate decode tok/s of `--streams` sequences decoding together in one
batch (one greedy token of every sequence per step), for each engine: first
with each sequence prefilled with the prompt on its own, then with the
prompt prefilled once and its cache shared by every sequence.

llama.cpp runs through llama-cpp-python (built from source into a venv under
$REALM_HOME on first use). Each engine runs in its own process so peak RSS is
its own. Usage:

    python3 scripts/bench_vs_llamacpp.py [--models smollm2-135m-instruct gemma3-270m]
        [--threads 2] [--prompt-tokens 128] [--gen-tokens 64] [--repeat 3] [--streams 16]
        [--json-schema scripts/bench_schema.json] [--adapters 4 --adapter-rank 16]

With --json-schema, each engine also decodes through its request path (Realm's
batcher, llama-cpp-python's `create_completion`) free and held to the schema
(llama.cpp by its grammar sampler, `LlamaGrammar.from_json_schema`); Realm also
with --streams streams of which half are held to it.

With --adapters, Realm writes that many synthetic LoRA adapters (random
factors on every weight) and decodes with and without them (one stream with
one adapter; --streams streams spread over all of them, in one batch), and
llama.cpp decodes the same prompt with adapter 0 (`lora_path`) and without;
with --streams also every stream with adapter 0 (llama.cpp sets adapters per
context, so it cannot batch sequences with different adapters).
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
from llama_cpp import Llama
args = json.loads(sys.argv[1])
llm = Llama(model_path=args["path"], n_threads=args["threads"], n_threads_batch=args["threads"],
            n_ctx=len(args["prompt_ids"]) + args["gen_tokens"] + 8, n_batch=512, verbose=False,
            lora_path=args.get("lora"))
best_prefill = best_decode = 0.0
for _ in range(args["repeat"]):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(args["prompt_ids"])
    t1 = time.perf_counter()
    for _ in range(args["gen_tokens"]):
        logits = llm.scores[llm.n_tokens - 1]
        llm.eval([int(logits.argmax())])
    t2 = time.perf_counter()
    best_prefill = max(best_prefill, len(args["prompt_ids"]) / (t1 - t0))
    best_decode = max(best_decode, args["gen_tokens"] / (t2 - t1))
print(json.dumps({"prefill_tokens_per_second": best_prefill, "decode_tokens_per_second": best_decode,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

# llama.cpp's request path (`create_completion`, streamed), free and held to a
# JSON schema by llama.cpp's grammar sampler: decode tok/s from the first
# piece on (one piece per token), best of `repeat`.
CONSTRAINED_CHILD = r"""
import json, sys, time
from llama_cpp import Llama, LlamaGrammar
args = json.loads(sys.argv[1])
llm = Llama(model_path=args["path"], n_threads=args["threads"], n_threads_batch=args["threads"],
            n_ctx=len(args["prompt_ids"]) + args["gen_tokens"] + 8, n_batch=512, verbose=False)
grammar = LlamaGrammar.from_json_schema(args["schema"], verbose=False)
def rate(g):
    best = 0.0
    for _ in range(args["repeat"]):
        llm.reset()
        first = last = None
        n = 0
        for _piece in llm.create_completion(args["prompt_ids"], max_tokens=args["gen_tokens"],
                                            temperature=0.0, grammar=g, stream=True):
            last = time.perf_counter()
            first = first or last
            n += 1
        if n > 1:
            best = max(best, (n - 1) / (last - first))
    return best
print(json.dumps({"batcher_decode_tokens_per_second": rate(None),
                  "constrained_decode_tokens_per_second": rate(grammar)}))
"""

# llama.cpp's own batched decode through its C API: one context with a
# sequence per stream, every step one `llama_decode` of a token per sequence,
# greedy picks from each one's logits. Without "shared", each sequence has
# its own KV stream (llama.cpp's default) and prefills its own prompt; with
# it, one unified KV cache where the prompt is prefilled once and copied to
# every sequence with `llama_memory_seq_cp` (which shares its cells).
BATCHED_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp as L
args = json.loads(sys.argv[1])
prompt, gen, streams = args["prompt_ids"], args["gen_tokens"], args["streams"]
L.llama_backend_init()
model = L.llama_model_load_from_file(args["path"].encode(), L.llama_model_default_params())
cp = L.llama_context_default_params()
cp.n_ctx = streams * (len(prompt) + gen + 8)
cp.n_batch = cp.n_ubatch = max(512, len(prompt), streams)
cp.n_seq_max = streams
cp.n_threads = cp.n_threads_batch = args["threads"]
cp.kv_unified = args["shared"]
ctx = L.llama_init_from_model(model, cp) if model else None
if not ctx:
    sys.exit(f"llama.cpp could not load {args['path']} with {streams} sequences")
if args.get("lora"):
    lora = L.llama_adapter_lora_init(model, args["lora"].encode())
    adapters = (L.llama_adapter_lora_p_ctypes * 1)(lora)
    if not lora or L.llama_set_adapters_lora(ctx, adapters, 1, (L.ctypes.c_float * 1)(1.0)) != 0:
        sys.exit(f"llama.cpp could not apply {args['lora']}")
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
batch = L.llama_batch_init(max(len(prompt), streams), 0, 1)

def decode(items):
    batch.n_tokens = len(items)
    for i, (token, pos, seq, logits) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits
    if L.llama_decode(ctx, batch) != 0:
        sys.exit("llama_decode failed")

def greedy(i):
    return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

def greedy_all():
    # Every sequence's logits in one array (each token asked for them), one argmax call.
    rows = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(streams, n_vocab))
    return [int(t) for t in rows.argmax(axis=1)]

best = 0.0
for _ in range(args["repeat"]):
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    tokens = []
    if args["shared"]:
        decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        tokens = [greedy(len(prompt) - 1)] * streams
        for s in range(1, streams):
            L.llama_memory_seq_cp(L.llama_get_memory(ctx), 0, s, -1, -1)
    else:
        for s in range(streams):
            decode([(t, p, s, p == len(prompt) - 1) for p, t in enumerate(prompt)])
            tokens.append(greedy(len(prompt) - 1))
    t0 = time.perf_counter()
    for step in range(gen):
        decode([(tokens[s], len(prompt) + step, s, True) for s in range(streams)])
        tokens = greedy_all()
    best = max(best, gen * streams / (time.perf_counter() - t0))
key = "batched_shared_prompt" if args["shared"] else "batched"
key = "adapted_" + key if args.get("lora") else key
print(json.dumps({f"{key}_decode_tokens_per_second": best}))
"""


def realm_home() -> Path:
    return Path(os.environ.get("REALM_HOME", Path.home() / ".realm"))


def venv_python() -> Path:
    venv = realm_home() / "bench-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import llama_cpp, numpy"], capture_output=True)
    if probe.returncode != 0:
        print(f"installing {LLAMA_CPP_PYTHON} (builds llama.cpp from source; takes a while once)", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON, "numpy"], check=True,
                       env={**os.environ, "MAKEFLAGS": f"-j{os.cpu_count() or 2}"})
    return python


def realm_host(*args: str) -> str:
    cmd = ["cargo", "run", "--release", "--quiet", "-p", "realm-host", "--", *args]
    return subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=int, default=16,
                        help="sequences decoding together for the batched rows (0 skips them)")
    parser.add_argument("--json-schema", type=Path,
                        help="also decode free and held to this JSON schema (a file)")
    parser.add_argument("--adapters", type=int, default=0,
                        help="also decode with this many synthetic LoRA adapters")
    parser.add_argument("--adapter-rank", type=int, default=16)
    args = parser.parse_args()
    adapter_dir = Path(tempfile.mkdtemp(prefix="realm-adapters-")) if args.adapters else None

    python = venv_python()
    rows = []
    for model in args.models:
        realm_host("models", "pull", model)
        path = realm_home() / "models" / f"{model}.gguf"
        ours = json.loads(realm_host(
            "bench", "--model", model, "--json", "--threads", str(args.threads),
            "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
            "--repeat", str(args.repeat), "--streams", str(args.streams),
            *(["--json-schema", str(args.json_schema)] if args.json_schema else []),
            *(["--adapters", str(args.adapters), "--adapter-rank", str(args.adapter_rank),
               "--save-adapters", str(adapter_dir / model)] if args.adapters else [])))
        child_args = {"path": str(path), "threads": args.threads, "prompt_ids": ours["prompt_ids"],
                      "gen_tokens": args.gen_tokens, "repeat": args.repeat, "streams": args.streams}

        def child(script: str, **extra) -> dict:
            given = json.dumps({**child_args, **extra})
            return json.loads(subprocess.run([str(python), "-c", script, given],
                                             check=True, capture_output=True, text=True).stdout)

        theirs = child(CHILD)
        if args.json_schema:
            theirs.update(child(CONSTRAINED_CHILD, schema=args.json_schema.read_text()))
        if args.streams:
            theirs.update(child(BATCHED_CHILD, shared=False))
            theirs.update(child(BATCHED_CHILD, shared=True))
        if args.adapters:
            lora = str(adapter_dir / model / "adapter-0.gguf")
            adapted = child(CHILD, lora=lora)
            theirs["adapted_stream_decode_tokens_per_second"] = adapted["decode_tokens_per_second"]
            if args.streams:
                theirs.update(child(BATCHED_CHILD, shared=False, lora=lora))
        rows.append((model, ours, theirs))
    if adapter_dir:
        shutil.rmtree(adapter_dir)

    print(f"threads={args.threads}, prompt={args.prompt_tokens} tokens, generate={args.gen_tokens} tokens, "
          f"best of {args.repeat}\n")
    print("| model | metric | Realm | llama.cpp | Realm / llama.cpp |")
    print("|---|---|---|---|---|")
    for model, ours, theirs in rows:
        for key, label, unit, scale in [
            ("prefill_tokens_per_second", "prefill", "tok/s", 1),
            ("decode_tokens_per_second", "decode", "tok/s", 1),
            ("peak_rss_bytes", "peak RSS", "MiB", 1 / (1 << 20)),
        ]:
            a, b = ours[key] * scale, theirs[key] * scale
            print(f"| {model} | {label} | {a:.1f} {unit} | {b:.1f} {unit} | {a / b:.2f}x |")
        if args.streams:
            for key, label in [("batched", ""), ("batched_shared_prompt", ", shared prompt")]:
                key = f"{key}_decode_tokens_per_second"
                a, b = ours[key], theirs[key]
                print(f"| {model} | decode, {args.streams} streams{label} | {a:.1f} tok/s | {b:.1f} tok/s "
                      f"| {a / b:.2f}x |")
                gain = [x[key] / x["decode_tokens_per_second"] for x in (ours, theirs)]
                print(f"| {model} | {args.streams} streams{label} / one stream | {gain[0]:.2f}x "
                      f"| {gain[1]:.2f}x | |")
        if args.adapters:
            plain, adapted = ours["stream_decode_tokens_per_second"], ours["adapted_stream_decode_tokens_per_second"]
            theirs_adapted = theirs["adapted_stream_decode_tokens_per_second"]
            print(f"| {model} | decode, one stream, rank-{args.adapter_rank} adapter | {adapted:.1f} tok/s "
                  f"| {theirs_adapted:.1f} tok/s | {adapted / theirs_adapted:.2f}x |")
            print(f"| {model} | one stream, adapter / none | {adapted / plain:.2f}x "
                  f"| {theirs_adapted / theirs['decode_tokens_per_second']:.2f}x | |")
            if args.streams:
                plain, adapted = (ours["streams_decode_tokens_per_second"],
                                  ours["adapted_streams_decode_tokens_per_second"])
                theirs_one = theirs["adapted_batched_decode_tokens_per_second"]
                print(f"| {model} | decode, {args.streams} streams: Realm over {args.adapters} adapters, "
                      f"llama.cpp all on adapter 0 | {adapted:.1f} tok/s | {theirs_one:.1f} tok/s "
                      f"| {adapted / theirs_one:.2f}x |")
                print(f"| {model} | {args.streams} streams, adapters / none | {adapted / plain:.2f}x "
                      f"| {theirs_one / theirs['batched_decode_tokens_per_second']:.2f}x | |")
        if args.json_schema:
            free, held = "batcher_decode_tokens_per_second", "constrained_decode_tokens_per_second"
            for key, label in [(free, "decode, request path, free"), (held, "decode, request path, schema")]:
                a, b = ours[key], theirs[key]
                print(f"| {model} | {label} | {a:.1f} tok/s | {b:.1f} tok/s | {a / b:.2f}x |")
            print(f"| {model} | schema / free | {ours[held] / ours[free]:.2f}x "
                  f"| {theirs[held] / theirs[free]:.2f}x | |")
            if args.streams:
                half = ours["half_constrained_streams_decode_tokens_per_second"]
                all_free = ours["batcher_streams_decode_tokens_per_second"]
                print(f"| {model} | {args.streams} streams, half held / all free | {half / all_free:.2f}x "
                      f"| | |")


if __name__ == "__main__":
    main()
