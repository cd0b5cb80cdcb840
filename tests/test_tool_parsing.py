"""Replies read back into OpenAI tool_calls in each family's format (serve/tools.py): Hermes `<tool_call>`
blocks, Llama-3.1's JSON (after an optional <|python_tag|>, several calls joined by ';' as vLLM's llama3_json
parser reads them), Mistral's `[TOOL_CALLS] [...]` list with its 9-character ids; streamed text held back
only while it may be a call; forced calls constrained to each format's JSON."""
from __future__ import annotations

import json

import pytest

from camelid.serve import tools
from camelid.serve.schemas import ChatCompletionRequest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


def _plan(fmt: str, choice=None, parallel=None) -> tools.ToolPlan:
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, TIME],
                                 tool_choice=choice, parallel_tool_calls=parallel)
    template = type("T", (), {"tool_format": fmt})()
    return tools.plan(body, template)


def _calls(text: str, fmt: str, **kw) -> tuple[str, list[tuple[str, dict]]]:
    content, calls = tools.parse(text, _plan(fmt, **kw))
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_calls_after_text():
    reply = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' \
            '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert _calls(reply, "hermes") == ("Let me check.", [("get_weather", {"city": "Rome"}), ("get_time", {})])
    assert len(_calls(reply, "hermes", parallel=False)[1]) == 1
    assert _calls("no call <tool_call> {broken", "hermes") == ("no call <tool_call> {broken", [])
    forced = _plan("hermes", "required")
    assert tools.parse('{"name": "get_time", "arguments": {"tz": "UTC"}}', forced)[1][0]["id"].startswith("call_")


@pytest.mark.parametrize("reply", [
    '{"name": "get_weather", "parameters": {"city": "Rome"}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}',
    ' \n{"name": "get_weather", "arguments": {"city": "Rome"}}'])
def test_llama3_json_calls(reply):
    assert _calls(reply, "llama3") == ("", [("get_weather", {"city": "Rome"})])


def test_llama3_several_calls_and_plain_text():
    two = '{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}'
    assert _calls(two, "llama3") == ("", [("get_weather", {"city": "Rome"}), ("get_time", {})])
    for text in ("The weather is fine.", '{"temperature": 21}', '{"name": "get_time", "parameters": {}} and more',
                 '{"name": "x", "parameters": "not an object"}'):
        assert _calls(text, "llama3") == (text, [])


def test_mistral_calls_keep_or_make_nine_character_ids():
    reply = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "abc123XYZ"}, ' \
            '{"name": "get_time", "arguments": {"tz": "CET"}}]'
    content, calls = tools.parse(reply, _plan("mistral"))
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert calls[0]["id"] == "abc123XYZ" and len(calls[1]["id"]) == 9 and calls[1]["id"].isalnum()
    # [TOOL_CALLS] is a control token the text stream leaves out: the list alone is read too.
    assert _calls(' [{"name": "get_time", "arguments": {}}]', "mistral") == ("", [("get_time", {})])
    for text in ("[1] is a citation", "Sure.", '[{"arguments": {}}]'):
        assert _calls(text, "mistral") == (text, [])


def test_forced_plans_write_each_format():
    named = {"type": "function", "function": {"name": "get_time"}}
    hermes, llama, mistral = (_plan(f, named) for f in ("hermes", "llama3", "mistral"))
    assert (hermes.prefix, hermes.lead, hermes.schema["required"]) == ("<tool_call>\n", "", ["name", "arguments"])
    assert (llama.prefix, llama.lead, llama.schema["required"]) == ("", "", ["name", "parameters"])
    assert (mistral.prefix, mistral.lead) == ("[TOOL_CALLS]", " ")
    assert mistral.schema["type"] == "array" and mistral.schema["maxItems"] == 1
    assert mistral.schema["items"]["properties"]["name"] == {"const": "get_time"}
    required = _plan("mistral", "required")
    assert required.schema["maxItems"] == 2 and len(required.schema["items"]["anyOf"]) == 2
    assert _plan("llama3", "none").mode == "none" and _plan("llama3").mode == "auto"


@pytest.mark.parametrize("fmt,pieces,streamed", [
    ("llama3", ["The ", "weather"], "The weather"),
    ("llama3", [" ", '{"na', 'me": "get_time", "parameters": {}}'], ""),
    ("llama3", ["<|python", "_tag|>{}"], ""),
    ("mistral", ["Sure", ", here"], "Sure, here"),
    ("mistral", [" [", '{"name"'], ""),
    ("hermes", ["Let me check.", "\n<tool_", "call>\n{"], "Let me check.\n"),
])
def test_gate_holds_back_only_what_may_be_a_call(fmt, pieces, streamed):
    gate = tools.Gate(_plan(fmt))
    assert "".join(gate.feed(p) for p in pieces) == streamed


@pytest.mark.parametrize("fmt,reply", [
    ("hermes", '{"name": "get_weather", "arguments": {"city": "a}\\"b[", "n": [1, {"x": null}]}}'),
    ("llama3", '{"name": "get_time", "parameters": {"tz": "CET"}}'),
    ("mistral", ' [{"name": "get_time", "arguments": {"tz": "UTC"}}, {"name": "get_weather", "arguments": {}}]'),
])
def test_forced_calls_stream_their_arguments_as_they_are_written(fmt, reply):
    stream = tools.CallStream(fmt)
    deltas = [d for end in range(1, len(reply) + 1) for d in stream.feed(reply[:end])]
    calls = stream.calls()
    assert calls and tools.parse(reply, _plan(fmt, "required"))[1][0]["function"] == calls[0]["function"]
    for k, call in enumerate(calls):
        mine = [d for d in deltas if d["index"] == k]
        assert mine[0]["id"] == call["id"] and mine[0]["function"] == {"name": call["function"]["name"], "arguments": ""}
        assert len(mine) == 1 + len(call["function"]["arguments"])  # piece by piece as written, not at the end
        assert "".join(d["function"]["arguments"] for d in mine) == call["function"]["arguments"]
        json.loads(call["function"]["arguments"])
    assert not tools.CallStream(fmt).feed(reply[:8]) or tools.CallStream(fmt).calls() == []
    unfinished = tools.CallStream(fmt)
    unfinished.feed(reply[:-3])
    assert unfinished.calls() == []
