"""Structured output through the official `openai` client, checked by
Python's `jsonschema`: every reply to a strict `json_schema` request must
parse and validate. The same questions asked without `response_format`
(the schema only described in the prompt) are counted for contrast.

Run by tests/serve.rs with REALM_BASE_URL (".../v1") and REALM_KEY (a tenant
allowed the model "small"); REALM_SO_PROMPTS prompts per schema (default
10; `just structured-output` runs 50, and the unconstrained contrast, which
REALM_SO_CONTRAST=1 turns on). Prints one JSON summary.
"""

import concurrent.futures
import json
import os
import time

import jsonschema
import openai

client = openai.OpenAI(base_url=os.environ["REALM_BASE_URL"], api_key=os.environ["REALM_KEY"],
                       max_retries=0, timeout=600)
per_schema = int(os.environ.get("REALM_SO_PROMPTS", "10"))

SCHEMAS = {
    "person": {  # nested object, bounded integer, optional field
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string", "maxLength": 40},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30},
                               "country": {"type": "string", "maxLength": 30}},
                "required": ["city", "country"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "shopping": {  # array of objects, numbers with bounds
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"product": {"type": "string", "maxLength": 20},
                                   "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                                   "price": {"type": "number", "minimum": 0, "maximum": 10000}},
                    "required": ["product", "quantity", "price"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "sentiment": {  # enums
        "type": "object",
        "properties": {"sentiment": {"enum": ["positive", "neutral", "negative"]},
                       "confidence": {"enum": ["low", "medium", "high"]}},
        "required": ["sentiment", "confidence"],
        "additionalProperties": False,
    },
    "event": {  # strings with patterns, booleans
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 50},
                       "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                       "online": {"type": "boolean"}},
        "required": ["title", "date", "online"],
        "additionalProperties": False,
    },
    "tags": {  # array of strings, unique-ish, bounded
        "type": "object",
        "properties": {"topic": {"type": "string", "maxLength": 40},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                "minItems": 1, "maxItems": 4}},
        "required": ["topic", "tags"],
        "additionalProperties": False,
    },
}

SUBJECTS = [
    "a friend of mine who lives in Paris", "my grandmother", "a famous scientist", "a chef in Rome",
    "the weekly groceries", "a birthday party", "a review of a new phone", "a rainy holiday",
    "a football match", "a job interview", "a trip to Japan", "a book about the ocean",
    "a concert last night", "a broken laptop", "a new bakery in town", "a marathon",
    "a science fair", "an online course", "a garden full of roses", "a late train",
    "a chess tournament", "a hiking trip", "a movie about robots", "a team meeting",
    "a museum visit", "a cooking class", "a lost cat", "a wedding", "a power outage",
    "a podcast about history", "a snowstorm", "a yoga retreat", "a startup launch",
    "a school reunion", "a bike repair", "a farmers market", "a space mission",
    "a jazz festival", "a dentist appointment", "a volunteering day", "a board game night",
    "a house move", "a coffee shop", "a music lesson", "a charity run", "a library",
    "a photography exhibition", "a camping weekend", "a city marathon", "a piano recital",
]


def ask(schema_name, subject, constrained):
    schema = SCHEMAS[schema_name]
    prompt = f"Describe {subject} as JSON."
    if not constrained:
        prompt += " The JSON must match this schema: " + json.dumps(schema)
    kwargs = {}
    if constrained:
        kwargs["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": schema_name, "strict": True, "schema": schema}}
    reply = client.chat.completions.create(
        model="small", messages=[{"role": "user", "content": prompt}], max_tokens=400,
        temperature=0.7, seed=len(subject), **kwargs)
    text = reply.choices[0].message.content
    try:
        jsonschema.validate(json.loads(text), schema)
        return True, text, reply.choices[0].finish_reason
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False, text, reply.choices[0].finish_reason


jobs = [(s, subject) for s in SCHEMAS for subject in SUBJECTS[:per_schema]]
start = time.monotonic()
with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    constrained = list(pool.map(lambda j: ask(j[0], j[1], True), jobs))
    seconds = time.monotonic() - start
    contrast = os.environ.get("REALM_SO_CONTRAST") == "1"
    free = list(pool.map(lambda j: ask(j[0], j[1], False), jobs)) if contrast else None

invalid = [(job, text, finish) for job, (ok, text, finish) in zip(jobs, constrained) if not ok]
print(json.dumps({
    "requests": len(jobs),
    "constrained_valid": sum(ok for ok, _, _ in constrained),
    "free_valid": None if free is None else sum(ok for ok, _, _ in free),
    "constrained_seconds": round(seconds, 1),
    "invalid": invalid[:3],
}))
assert not invalid, invalid[:3]
