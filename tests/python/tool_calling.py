"""Tool calling through the official `openai` client, checked by Python's
`jsonschema`: with `tool_choice` `required` or a named function every reply
is a call whose arguments validate against the function's schema, streamed
calls reassemble to the non-streamed ones, and a call's result sent back as
a `tool` message gets a final answer. Bad tool requests are 400s.

Run by tests/serve.rs with REALM_BASE_URL (".../v1") and REALM_KEY (a tenant
allowed the model "small"); REALM_TC_PROMPTS questions (default 6). Prints
one JSON summary.
"""

import json
import os

import jsonschema
import openai

client = openai.OpenAI(base_url=os.environ["REALM_BASE_URL"], api_key=os.environ["REALM_KEY"],
                       max_retries=0, timeout=600)
prompts = int(os.environ.get("REALM_TC_PROMPTS", "6"))

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Converts an amount of money between currencies.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number", "minimum": 0, "maximum": 1000000},
                    "from": {"type": "string", "enum": ["USD", "EUR", "JPY", "GBP"]},
                    "to": {"type": "string", "enum": ["USD", "EUR", "JPY", "GBP"]},
                },
                "required": ["amount", "from", "to"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

QUESTIONS = [
    "What's the weather like in Paris right now?",
    "How much is 250 dollars in euros?",
    "Is it raining in Tokyo?",
    "Convert 90 pounds to yen, please.",
    "Should I take a coat in Oslo today?",
    "What is 1000 euros in US dollars?",
    "Tell me the temperature in Lima in fahrenheit.",
    "I have 42 GBP. How many EUR is that?",
]


def ask(question, **kwargs):
    return client.chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        max_tokens=96,
        temperature=0,
        **kwargs,
    )


def check_calls(calls):
    """Every call names a tool and its arguments validate; returns them."""
    assert calls, "no tool call"
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


summary = {"required": 0, "named": 0, "streamed_equal": 0}

# tool_choice=required: a valid call, every time.
for question in (QUESTIONS * 4)[:prompts]:
    reply = ask(question, tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(check_calls(choice.message.tool_calls)) == 1, choice
    summary["required"] += 1

# Parallel calls (the default): as many as the model makes, each valid. A
# model this small repeats calls until the token limit, where the call cut
# short is left as text and the reply ends by `length`.
reply = ask(QUESTIONS[0], tool_choice="required").choices[0]
summary["parallel_calls"] = len(check_calls(reply.message.tool_calls))
assert reply.finish_reason in ("tool_calls", "length"), reply

# A named function: that one.
for question in QUESTIONS[:2]:
    reply = ask(question, tool_choice={"type": "function", "function": {"name": "convert_currency"}},
                parallel_tool_calls=False)
    calls = check_calls(reply.choices[0].message.tool_calls)
    assert [name for name, _ in calls] == ["convert_currency"], calls
    summary["named"] += 1

# Streamed calls reassemble to the non-streamed ones (greedy, so equal).
for question in QUESTIONS[:2]:
    whole = check_calls(ask(question, tool_choice="required").choices[0].message.tool_calls)
    parts, finish = {}, None
    for chunk in ask(question, tool_choice="required", stream=True):
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            part = parts.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id:
                part["id"] = call.id
            if call.function and call.function.name:
                part["name"] = call.function.name
            if call.function and call.function.arguments:
                part["arguments"] += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish in ("tool_calls", "length"), finish
    streamed = [(p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())]
    assert all(p["id"].startswith("call_") for p in parts.values()), parts
    assert streamed == whole, (streamed, whole)
    summary["streamed_equal"] += 1

# A round trip: the call, its result as a `tool` message, the final answer.
question = "What's the weather like in Paris right now?"
first = ask(question, tool_choice="required", parallel_tool_calls=False).choices[0].message
history = [{"role": "user", "content": question}, first]
for call in first.tool_calls:
    result = {"city": "Paris", "temperature": 21, "unit": "celsius", "sky": "sunny"}
    history.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
final = client.chat.completions.create(model="small", messages=history, tools=TOOLS, tool_choice="none",
                                       max_tokens=48, temperature=0)
answer = final.choices[0]
assert answer.message.tool_calls is None and answer.message.content, answer
assert answer.finish_reason in ("stop", "length"), answer
summary["final_answer"] = answer.message.content

# With `auto`, the model may answer or call; a call it makes is valid.
auto = ask("Hello! How are you today?", tool_choice="auto").choices[0]
if auto.message.tool_calls:
    check_calls(auto.message.tool_calls)
summary["auto"] = "call" if auto.message.tool_calls else "text"

# Bad tool requests are refused before anything is generated.
refused = 0
for kwargs in [
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}},
    {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
     "tool_choice": "required"},
    {"tools": TOOLS, "response_format": {"type": "json_object"}},
    {"tool_choice": "required"},
]:
    try:
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=8, **kwargs)
    except openai.BadRequestError as e:
        assert e.body["code"] == "invalid_input", e.body
        refused += 1
summary["refused"] = refused
assert refused == 5, refused

print(json.dumps(summary))
