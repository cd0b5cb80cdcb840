"""Tool calling in the Hermes format (Qwen2/Qwen2.5's `<tool_call>` JSON, NousResearch Hermes 2 Pro), put
into any template as text:

- `tools` become a "# Tools" block at the end of the system message, worded as Qwen2.5's template words it;
- an assistant message's `tool_calls` become `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` lines;
- `tool` messages (consecutive ones together) become a user turn of `<tool_response>` blocks.

With ChatML templates this is Qwen2.5's own rendering. `tool_choice` "required" or a named function forces
a call: the prompt ends with `<tool_call>\\n` and the reply is constrained to the call's JSON schema
(name and arguments); "auto" lets the model choose and the reply is parsed for `<tool_call>` blocks.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .schemas import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
         "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
         "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
         "<args-json-object>}\n</tool_call>")
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)


@dataclass
class ToolPlan:
    """How a chat request uses tools: `mode` none | auto | forced; `schema` constrains a forced call."""
    mode: str = "none"
    schema: dict | None = None
    prefix: str = ""  # text the prompt ends with (a forced call's opening tag)
    single: bool = False  # parallel_tool_calls: false keeps the first call of a reply


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)  # as jinja's tojson in transformers writes it


def plan(body) -> ToolPlan:
    tools, choice = body.tools or [], body.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if not tools or choice == "none":
        return ToolPlan()
    if choice in (None, "auto"):
        return ToolPlan("auto", single=body.parallel_tool_calls is False)
    chosen = tools
    if not isinstance(choice, str):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
    options = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                 "arguments": t.function.parameters or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return ToolPlan("forced", schema, OPEN + "\n")


def messages(body, default_system: str | None) -> list[dict[str, str]]:
    """The request's messages as plain {role, content} dicts for a template, tools rendered as text."""
    out: list[dict[str, str]] = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role in ("system", "user", "tool") and m.content is None:
            raise APIError(400, f"messages[{i}] ({m.role}) has no content", param=f"messages[{i}].content")
        text = m.text()
        if role == "assistant" and m.tool_calls:
            calls = [f"{OPEN}\n{{\"name\": {_dump(c.function.name)}, \"arguments\": {_arguments(c, i)}}}\n{CLOSE}"
                     for c in m.tool_calls]
            text = "\n".join(([text] if text else []) + calls)
        if role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("tool"):
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "tool": True})
            continue
        out.append({"role": role, "content": text})
    if body.tools and body.tool_choice != "none":
        listing = "".join("\n" + _dump(t.model_dump(exclude_none=True, by_alias=True)) for t in body.tools)
        block = _HEAD + listing + _TAIL
        if out and out[0]["role"] == "system":
            out[0]["content"] += "\n\n" + block
        else:
            out.insert(0, {"role": "system", "content": ((default_system or "") + "\n\n" + block).lstrip("\n")})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _arguments(call, i: int) -> str:
    try:
        return _dump(json.loads(call.function.arguments))
    except ValueError:
        raise APIError(400, f"messages[{i}].tool_calls: arguments of {call.function.name!r} are not JSON",
                       param=f"messages[{i}].tool_calls") from None


def parse(text: str, forced: bool, single: bool = False) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a reply; a forced reply is the call's JSON itself."""
    bodies = [text] if forced else [m.group(1) for m in _CALL.finditer(text)]
    bodies = bodies[:1] if single else bodies
    calls = []
    for raw in bodies:
        try:
            call = json.loads(raw)
        except ValueError:
            continue  # not a call after all: it stays in the content
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"], "arguments": _dump(call.get("arguments", {}))}})
    if forced:
        return "", calls
    content = text.split(OPEN, 1)[0].strip() if calls else text
    return content, calls
