"""`summarize`: a `step`-world component in Python (componentize-py).

Input (JSON): ``{"text": "...", "model": "small", "max_tokens": 48}``.
Streams a short summary of ``text`` from the model piece by piece (``llm.stream``)
and caches it in the tenant's kv store under the text's SHA-256, so the same
text is summarized only once. Output:
``{"summary": "...", "pieces": N, "cached": bool, "usage": {...}}``.
"""

import hashlib
import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import kv, llm, log
from wit_world.imports.types import Sampling

PROMPT = "{text}\n\nIn one sentence, the text above says that"


def describe(error) -> str:
    """A host `error` variant as one line of text."""
    name = type(error).__name__.removeprefix("Error_")
    value = getattr(error, "value", None)
    return f"{name}: {value}" if value else name


def greedy(max_tokens: int) -> Sampling:
    """Greedy decoding up to the end of the sentence, so a summary is reproducible."""
    return Sampling(
        max_tokens=max_tokens,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repeat_penalty=1.0,
        seed=None,
        stop=["\n"],
    )


def summarize(model: str, text: str, max_tokens: int) -> dict:
    """Streams the summary from the model; returns the step's output."""
    pieces = []
    try:
        stream = llm.stream(model, PROMPT.format(text=text.strip()), greedy(max_tokens))
    except Err as e:
        raise Err(describe(e.value))
    with stream:
        while (item := stream.next()) is not None:
            if isinstance(item, Err):
                raise Err(describe(item.value))
            pieces.append(item.value)
        usage = stream.usage()
    log.log(log.Level.DEBUG, f"summarized {len(text)} chars in {len(pieces)} pieces")
    return {
        "summary": "".join(pieces).strip(),
        "pieces": len(pieces),
        "cached": False,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
        },
    }


class WitWorld(wit_world.WitWorld):
    def run(self, input: str) -> str:
        try:
            request = json.loads(input)
        except json.JSONDecodeError as e:
            raise Err(f"input is not JSON: {e}")
        text = request.get("text")
        model = request.get("model", "small")
        max_tokens = request.get("max_tokens", 48)
        if not isinstance(text, str) or not text.strip():
            raise Err("input needs a non-empty string field `text`")
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 512:
            raise Err("`max_tokens` must be an integer from 1 to 512")

        key = "summary/" + hashlib.sha256(f"{model}\0{max_tokens}\0{text}".encode()).hexdigest()[:32]
        try:
            cached = kv.get(key)
        except Err as e:
            raise Err(describe(e.value))
        if cached is not None:
            output = json.loads(cached)
            output["cached"] = True
            return json.dumps(output)

        output = summarize(model, text, max_tokens)
        try:
            kv.set(key, json.dumps(output).encode())
        except Err as e:
            log.log(log.Level.WARN, f"could not cache the summary: {describe(e.value)}")
        return json.dumps(output)
