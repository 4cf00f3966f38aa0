"""Hugging Face's renderings of real chat templates, as the reference
`models/tests/chat_templates.rs` checks Realm's renderer against.

    python scripts/chat_template_reference.py TEMPLATES_DIR OUT_JSON

TEMPLATES_DIR is llama.cpp's collection (`templates/` in the data
`scripts/llama-cpp-testdata.sh` fetches). Each listed template renders a set
of conversations with the conventions of `transformers`'
`apply_chat_template`: a sandboxed Jinja2 environment with `trim_blocks` and
`lstrip_blocks`, the loop-controls extension, `raise_exception`,
`strftime_now` (fixed here at 2026-12-06 so the output is reproducible) and
a `tojson` that writes non-ASCII as is. A template that raises records
`null`. Needs only `jinja2` (pinned in tests/python/requirements.txt).
"""

import datetime
import hashlib
import json
import pathlib
import sys

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATES = [
    "meta-llama-Llama-3.1-8B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct",
    "Qwen-Qwen2.5-7B-Instruct",
    "Qwen-Qwen3-0.6B",
    "Qwen-QwQ-32B",
    "microsoft-Phi-3.5-mini-instruct",
    "google-gemma-2-2b-it",
    "mistralai-Mistral-Nemo-Instruct-2407",
    "Mistral-Small-3.2-24B-Instruct-2506",
    "HuggingFaceTB-SmolLM3-3B",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    "ibm-granite-granite-3.3-2B-Instruct",
]

BOS, EOS = "<BOS>", "<EOS>"
NOW = datetime.datetime(2026, 12, 6, 21, 30, 0)


def msg(role, content):
    return {"role": role, "content": content}


# (name, messages, add_generation_prompt, extra variables)
CASES = [
    ("user", [msg("user", "Hello!")], True, {}),
    ("system", [msg("system", "You are terse."), msg("user", "What is 2+2?")], True, {}),
    (
        "multi-turn",
        [
            msg("system", "You are terse."),
            msg("user", "What is 2+2?"),
            msg("assistant", "4."),
            msg("user", "And 3+3? Üñíçødé — 東京."),
        ],
        True,
        {},
    ),
    ("prefill", [msg("user", "Write a haiku."), msg("assistant", "Autumn moonlight")], False, {}),
    (
        "no-thinking",
        [msg("user", "Quick: capital of France?")],
        True,
        {"enable_thinking": False},
    ),
]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}

CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

# Conversations with tools: rendered by templates that show tools themselves.
CASES += [
    (
        "tools",
        [msg("system", "You are terse."), msg("user", "Weather in Paris?")],
        True,
        {"tools": [WEATHER]},
    ),
    (
        "tool-round-trip",
        [
            msg("user", "Weather in Paris?"),
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call12345", "content": '{"temp": 21}'},
        ],
        True,
        {"tools": [WEATHER]},
    ),
]


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: NOW.strftime(fmt)
    return env


def main():
    templates, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    env = environment()
    result = {"bos": BOS, "eos": EOS, "now": NOW.isoformat(), "templates": {}}
    for name in TEMPLATES:
        source = (templates / f"{name}.jinja").read_text()
        template = env.from_string(source)
        cases = {}
        for case, messages, generation, extra in CASES:
            try:
                text = template.render(
                    messages=messages,
                    add_generation_prompt=generation,
                    bos_token=BOS,
                    eos_token=EOS,
                    **extra,
                )
            except (TemplateError, TypeError):
                text = None
            cases[case] = text
        result["templates"][name] = {
            "sha256": hashlib.sha256(source.encode()).hexdigest(),
            "cases": cases,
        }
    out.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
