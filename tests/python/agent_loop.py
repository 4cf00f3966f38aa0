"""An agent framework's tool loop against Realm: LangChain's `ChatOpenAI`
(langchain-openai) with a tool bound. The model is made to call the tool
(`tool_choice` naming it), LangChain reads the call, the tool runs, its
result goes back as a `ToolMessage`, and the model answers in text.

Run by tests/serve.rs with REALM_BASE_URL (".../v1") and REALM_KEY (a tenant
allowed the model "small"). Prints one JSON summary.
"""

import json
import os

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

runs = []


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    runs.append(city)
    return json.dumps({"city": city, "temperature": 21, "sky": "sunny"})


llm = ChatOpenAI(model="small", base_url=os.environ["REALM_BASE_URL"], api_key=os.environ["REALM_KEY"],
                 temperature=0, max_tokens=64, max_retries=0, timeout=600)
messages = [HumanMessage("What's the weather in Paris?")]
ai = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False).invoke(messages)
assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather", ai
messages.append(ai)
for call in ai.tool_calls:
    messages.append(ToolMessage(content=get_weather.invoke(call["args"]), tool_call_id=call["id"]))
final = llm.bind_tools([get_weather], tool_choice="none").invoke(messages)
assert final.content and not final.tool_calls, final
print(json.dumps({"tool_runs": len(runs), "city": runs[0], "answer": final.content}))
