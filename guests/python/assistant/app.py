"""`assistant`: a `tenant`-world component in Python (componentize-py).

A chat assistant that remembers conversations in the tenant's kv store.
Requests (JSON):

- ``{"op": "say", "conversation": "c1", "message": "...", "max_tokens": 64}``
  → ``{"reply": "...", "turns": N, "model": "..."}``; with ``"schema": {...}``
  (a JSON Schema) the host holds the reply to it, and ``"value"`` is the
  reply parsed
- ``{"op": "history", "conversation": "c1"}`` → ``{"messages": [{role, content}, ...]}``
- ``{"op": "forget", "conversation": "c1"}`` → ``{"forgotten": bool}``
- ``{"op": "conversations"}`` → ``{"conversations": [...]}``

It uses the first model the tenant may call and keeps the last
``KEEP_MESSAGES`` messages of each conversation.
"""

import json

import wit_world
from componentize_py_types import Err
from realm_guest import greedy, host, max_tokens
from wit_world.imports import kv, llm, log
from wit_world.imports.types import Constraint_JsonSchema, Message

PREFIX = "conversation/"
KEEP_MESSAGES = 12
SYSTEM = "You are a helpful assistant. Answer briefly."


def field(request: dict, name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise Err(f"request needs a non-empty string field `{name}`")
    return value


def load(conversation: str) -> list:
    stored = host(kv.get, PREFIX + conversation)
    return json.loads(stored) if stored is not None else []


def say(request: dict) -> dict:
    conversation = field(request, "conversation")
    message = field(request, "message")
    limit = max_tokens(request, 64)
    models = host(llm.list_models)
    if not models:
        raise Err("this tenant may not use any model")
    model = models[0].name

    history = load(conversation) + [{"role": "user", "content": message}]
    messages = [Message("system", SYSTEM, [], None)] + [Message(m["role"], m["content"], [], None) for m in history]
    sampling = greedy(limit)
    schema = request.get("schema")
    if schema is not None:
        # Enforced by the host while decoding: no logits cross over.
        sampling.constraint = Constraint_JsonSchema(json.dumps(schema))
    completion = host(llm.chat, model, messages, None, sampling)
    reply = completion.text.strip()
    history = (history + [{"role": "assistant", "content": reply}])[-KEEP_MESSAGES:]
    host(kv.set, PREFIX + conversation, json.dumps(history).encode())
    log.log(log.Level.INFO, f"conversation {conversation}: {len(history)} messages")
    answer = {"reply": reply, "turns": len(history) // 2, "model": model}
    if schema is not None:
        answer["value"] = json.loads(completion.text)
    return answer


class WitWorld(wit_world.WitWorld):
    def handle(self, request: str) -> str:
        try:
            request = json.loads(request)
        except json.JSONDecodeError as e:
            raise Err(f"request is not JSON: {e}")
        if not isinstance(request, dict):
            raise Err("request must be a JSON object")
        op = request.get("op")
        if op == "say":
            reply = say(request)
        elif op == "history":
            reply = {"messages": load(field(request, "conversation"))}
        elif op == "forget":
            reply = {"forgotten": host(kv.delete, PREFIX + field(request, "conversation"))}
        elif op == "conversations":
            keys = host(kv.list_keys, PREFIX)
            reply = {"conversations": [k.removeprefix(PREFIX) for k in keys]}
        else:
            raise Err("`op` must be one of say, history, forget, conversations")
        return json.dumps(reply)
