"""Tool calling as text (serve/tools.py): a conversation with tools, calls and results rendered through the
qwen2.5 template equals Qwen2.5-Instruct's official jinja template rendered by transformers with the same
tools; replies are parsed back into OpenAI tool_calls."""
from __future__ import annotations

import json

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from camelid.chat import get_template
from camelid.serve import tools
from camelid.serve.schemas import APIError, ChatCompletionRequest

from .official_templates import QWEN25

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


def _conversation(system: bool) -> list[dict]:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]
    head = [{"role": "system", "content": "You are a weather bot."}] if system else []
    return head + [{"role": "user", "content": "Weather and time in Paris?"},
                   {"role": "assistant", "content": None, "tool_calls": calls},
                   {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
                   {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
                   {"role": "assistant", "content": "It is 21 degrees at 14:05."},
                   {"role": "user", "content": "Thanks! And in Rome?"}]


def _official(messages: list[dict], tool_list: list[dict] | None) -> str:
    hf_messages = []
    for m in messages:  # transformers' convention: a call's arguments as a dict
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", "function": {"name": c["function"]["name"],
                                                                 "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        hf_messages.append(m)
    [text], _ = render_jinja_template([hf_messages], tools=tool_list, chat_template=QWEN25, add_generation_prompt=True)
    return text


@pytest.mark.parametrize("system", [True, False])
def test_tools_calls_and_results_render_as_qwen25_does(system):
    messages = _conversation(system)
    body = ChatCompletionRequest(messages=messages, tools=[WEATHER, TIME])
    template = get_template("qwen2.5")
    ours = template.render_text(tools.messages(body, template.system["default"]), add_generation_prompt=True)
    assert ours == _official(messages, [WEATHER, TIME])
    # Without tools (or with tool_choice none) the tool block is left out, as Qwen2.5 does without tools.
    plain = [m for m in messages if m["role"] not in ("tool",) and not m.get("tool_calls")]
    body = ChatCompletionRequest(messages=plain, tools=[WEATHER], tool_choice="none")
    assert template.render_text(tools.messages(body, template.system["default"])) == _official(plain, None)


def test_plan_and_parse():
    def plan(choice):
        return tools.plan(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, TIME],
                                                tool_choice=choice))

    named = plan({"type": "function", "function": {"name": "get_time"}})
    assert named.mode == "forced" and named.prefix == "<tool_call>\n"
    assert named.schema["properties"]["name"] == {"const": "get_time"}
    required = plan("required")
    assert [o["properties"]["name"]["const"] for o in required.schema["anyOf"]] == ["get_weather", "get_time"]
    assert plan("none").mode == "none" and plan("auto").mode == "auto" and plan(None).mode == "auto"
    with pytest.raises(APIError, match="not among the tools"):
        plan({"type": "function", "function": {"name": "x"}})
    reply = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' \
            '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    content, calls = tools.parse(reply, forced=False)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert len(tools.parse(reply, forced=False, single=True)[1]) == 1
    assert tools.parse("no call <tool_call> {broken", forced=False) == ("no call <tool_call> {broken", [])
    assert tools.parse('{"name": "get_time", "arguments": {"tz": "UTC"}}', forced=True)[1][0]["function"]["name"] \
        == "get_time"
