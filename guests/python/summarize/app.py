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
from realm_guest import describe, greedy, host, max_tokens
from wit_world.imports import kv, llm, log

PROMPT = "{text}\n\nIn one sentence, the text above says that"


def summarize(model: str, text: str, limit: int) -> dict:
    """Streams the summary from the model; returns the step's output."""
    pieces = []
    # Greedy up to the end of the sentence, so a summary is reproducible.
    stream = host(llm.stream, model, PROMPT.format(text=text.strip()), greedy(limit, ["\n"]))
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
        if not isinstance(request, dict):
            raise Err("input must be a JSON object")
        text = request.get("text")
        model = request.get("model", "small")
        limit = max_tokens(request, 48)
        if not isinstance(text, str) or not text.strip():
            raise Err("input needs a non-empty string field `text`")

        key = "summary/" + hashlib.sha256(f"{model}\0{limit}\0{text}".encode()).hexdigest()[:32]
        cached = host(kv.get, key)
        if cached is not None:
            output = json.loads(cached)
            output["cached"] = True
            return json.dumps(output)

        output = summarize(model, text, limit)
        try:
            kv.set(key, json.dumps(output).encode())
        except Err as e:
            log.log(log.Level.WARN, f"could not cache the summary: {describe(e.value)}")
        return json.dumps(output)
