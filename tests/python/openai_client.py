"""Drives a running `realm-host serve` with the official `openai` client.

Run by tests/serve.rs with REALM_BASE_URL (".../v1"), REALM_KEY (a tenant key
allowed the model "small") and REALM_LIMITED_KEY (a tenant allowed one
request per minute). Every check asserts; the script prints one JSON summary.
"""

import json
import os

import openai

base_url = os.environ["REALM_BASE_URL"]
client = openai.OpenAI(base_url=base_url, api_key=os.environ["REALM_KEY"], max_retries=0)
question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]

# Models: only what this tenant may use.
models = [m.id for m in client.models.list()]
assert models == ["small"], models

# Chat, whole and streamed (greedy, so both give the same text).
whole = client.chat.completions.create(model="small", messages=question, max_tokens=24, temperature=0)
answer = whole.choices[0].message.content
assert "Paris" in answer, answer
assert whole.choices[0].message.role == "assistant"
assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0, whole.usage
assert whole.choices[0].finish_reason in ("stop", "length"), whole.choices[0].finish_reason

stream = client.chat.completions.create(
    model="small", messages=question, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
deltas, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            deltas.append(choice.delta.content)
        finish = choice.finish_reason or finish
assert len(deltas) > 1, deltas  # really streamed, token by token
assert "".join(deltas) == answer, (deltas, answer)
assert finish == whole.choices[0].finish_reason, finish
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage

# Text completion, with a stop sequence.
text = client.completions.create(model="small", prompt="The capital of France is", max_tokens=8,
                                 temperature=0, stop=["."])
assert "Paris" in text.choices[0].text and "." not in text.choices[0].text, text.choices[0].text
assert text.choices[0].finish_reason == "stop", text.choices[0].finish_reason

# Errors surface as the client's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=question, max_tokens=4)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    openai.OpenAI(base_url=base_url, api_key="rk_acme_" + "0" * 64, max_retries=0).models.list()
    raise AssertionError("bad key accepted")
except openai.AuthenticationError:
    pass
limited = openai.OpenAI(base_url=base_url, api_key=os.environ["REALM_LIMITED_KEY"], max_retries=0)
limited.models.list()
try:
    limited.models.list()
    raise AssertionError("rate limit not applied")
except openai.RateLimitError as e:
    assert e.body["code"] == "rate_limited", e.body
    assert int(e.response.headers["retry-after"]) >= 1, e.response.headers

print(json.dumps({"answer": answer, "deltas": len(deltas), "models": models}))
