"""OpenAI tool calling over the model's own tool format (camelid/chat/tools.py): hermes `<tool_call>` JSON
(Qwen2.5, and any template without a format of its own), llama3 JSON (Llama-3.1/3.2/3.3) or mistral
`[TOOL_CALLS]` (Mistral v0.3).

- `plan` reads `tools`/`tool_choice`: "none" leaves the tools out of the prompt; "auto" lets the model choose
  and its reply is parsed; "required" or a named function forces a call: the prompt ends where the format's
  call begins and the reply is constrained to the call's JSON schema in that format.
- `conversation` turns the request's messages into template messages (calls' arguments as dicts).
- `parse` reads a finished reply back into OpenAI `tool_calls`; `Gate` holds back streamed text that may be
  a call until the reply is complete.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..chat.tools import HERMES_CLOSE, HERMES_OPEN, dump, mistral_id, new_call_id
from ..generate import StopStringFilter
from .schemas import APIError

_CALL_KEYS = {"hermes": "arguments", "llama3": "parameters", "mistral": "arguments"}
_OPENERS = {"llama3": ("<|python_tag|>", "{"), "mistral": ("[TOOL_CALLS]", "[")}


@dataclass
class ToolPlan:
    """How a chat request uses tools: `mode` none | auto | forced, in the template's format `fmt`."""
    mode: str = "none"
    fmt: str = "hermes"
    schema: dict | None = None  # a forced call's JSON schema
    prefix: str = ""  # text the prompt ends with (the format's call opener, special tokens included)
    lead: str = ""  # text a forced reply writes before its JSON (Mistral's space after [TOOL_CALLS])
    single: bool = False  # parallel_tool_calls: false keeps the first call of a reply


def tool_format(template) -> str:
    """The format a template writes tools in (its spec's, or the one its jinja writes), else hermes as text."""
    return getattr(template, "tool_format", None) or "hermes"


def _call_schema(fmt: str, tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             _CALL_KEYS[fmt]: tool.function.parameters or {"type": "object"}},
            "required": ["name", _CALL_KEYS[fmt]], "additionalProperties": False}


def plan(body, template) -> ToolPlan:
    tools, choice = body.tools or [], body.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    fmt = tool_format(template)
    if not tools or choice == "none":
        return ToolPlan(fmt=fmt)
    if choice in (None, "auto"):
        return ToolPlan("auto", fmt, single=body.parallel_tool_calls is False)
    chosen = tools
    if not isinstance(choice, str):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
    options = [_call_schema(fmt, t) for t in chosen]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    if fmt == "mistral":  # a list of calls after the [TOOL_CALLS] token: at most one per tool offered
        single = body.parallel_tool_calls is False or not isinstance(choice, str)
        schema = {"type": "array", "items": schema, "minItems": 1, "maxItems": 1 if single else len(chosen)}
        return ToolPlan("forced", fmt, schema, "[TOOL_CALLS]", " ")
    return ToolPlan("forced", fmt, schema, HERMES_OPEN + "\n" if fmt == "hermes" else "")


def _arguments(call, i: int):
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        raise APIError(400, f"messages[{i}].tool_calls: arguments of {call.function.name!r} are not JSON",
                       param=f"messages[{i}].tool_calls") from None


def conversation(body) -> list[dict]:
    """The request's messages for a template: role, content, and calls with their arguments as dicts."""
    out: list[dict] = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role in ("system", "user", "tool") and m.content is None:
            raise APIError(400, f"messages[{i}] ({m.role}) has no content", param=f"messages[{i}].content")
        message = {"role": role, "content": m.text()}
        if role == "assistant" and m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": _arguments(c, i)}}
                                     for c in m.tool_calls]
        if role == "tool":
            message["tool_call_id"] = m.tool_call_id or ""
        out.append(message)
    return out


def tool_list(body, plan: ToolPlan) -> list[dict] | None:
    """The tools the prompt offers (none when tool_choice is "none")."""
    if plan.mode == "none":
        return None
    return [t.model_dump(exclude_none=True, by_alias=True) for t in body.tools]


def _call(fmt: str, name: str, arguments, call_id: str | None = None) -> dict:
    if fmt == "mistral" and call_id:
        call_id = mistral_id(call_id)
    return {"id": call_id or new_call_id(fmt), "type": "function",
            "function": {"name": name, "arguments": dump(arguments if arguments is not None else {})}}


def _values(text: str, separator: str = "") -> list | None:
    """The JSON values `text` consists of (separated by whitespace and `separator`), or None."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or (separator and text[pos] == separator)):
            pos += 1
        if pos == len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)


def _named(value, key: str) -> bool:
    return isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get(key, {}), dict)


def parse(text: str, plan: ToolPlan) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a finished reply; a reply that is not a call in the format stays content."""
    if plan.mode == "forced":
        stream = CallStream(plan.fmt)
        stream.feed(text)
        return ("", stream.calls()) if stream.calls() else (text, [])
    if plan.fmt == "hermes":
        content, calls = _parse_hermes(text)
    else:
        body = text.strip()
        opener, bracket = _OPENERS[plan.fmt]
        body = body[len(opener):].strip() if body.startswith(opener) else body
        if not body.startswith(bracket):
            return text, []
        values = _values(body, ";" if plan.fmt == "llama3" else "")
        if plan.fmt == "mistral":
            values = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
        key = _CALL_KEYS[plan.fmt]
        # Llama writes "parameters" (some fine-tunes "arguments"); either is read.
        if plan.fmt == "llama3":
            values = [v if not isinstance(v, dict) or "parameters" in v or "arguments" not in v
                      else {**v, "parameters": v["arguments"]} for v in values or []]
        found = [v for v in values or [] if _named(v, key)]
        if not values or len(found) != len(values):
            return text, []
        content = ""
        calls = [_call(plan.fmt, v["name"], v.get(key), v.get("id")) for v in found]
    return content, calls[:1] if plan.single else calls


def _parse_hermes(text: str) -> tuple[str, list[dict]]:
    bodies, rest = [], text
    while HERMES_OPEN in rest:
        rest = rest.split(HERMES_OPEN, 1)[1]
        body, _, rest = rest.partition(HERMES_CLOSE)
        bodies.append(body.strip())
    calls = []
    for raw in bodies:
        values = _values(raw)
        if values and len(values) == 1 and _named(values[0], "arguments"):
            calls.append(_call("hermes", values[0]["name"], values[0].get("arguments")))
    if not calls:
        return text, calls
    return text.split(HERMES_OPEN, 1)[0].strip(), calls


_HEAD = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "(?:arguments|parameters)": ')


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON value that starts at `start` ends, or None while it is still open."""
    depth, in_string, escaped = 0, False, False
    for j in range(start, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth <= 0:
                return j + 1 if depth == 0 else j  # below 0: a bare value closed by what holds it
        elif c == "," and depth == 0:
            return j
    return None


class CallStream:
    """The calls of a forced reply as it is written (the grammar fixes their layout: `{"name": ..., "arguments"
    or "parameters": ...}`, in a list for Mistral): OpenAI's deltas, a call's id and name first, then pieces of
    its arguments as they come. The arguments are the reply's own text, so the pieces add up to them."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self._calls: list[dict] = []  # id, name, start and end of the arguments, how much of them went out
        self._text = ""

    def feed(self, text: str) -> list[dict]:
        """The deltas that `text` (the whole reply so far) adds."""
        self._text = text
        out: list[dict] = []
        if self._calls and self._calls[-1]["end"] is None:
            self._advance(self._calls[-1], text, out)
        while not self._calls or self._calls[-1]["end"] is not None:
            head = _HEAD.search(text, self._calls[-1]["end"] if self._calls else 0)
            if head is None:
                break
            call = {"id": new_call_id(self.fmt), "name": json.loads(head.group(1)), "start": head.end(), "end": None,
                    "sent": 0}
            self._calls.append(call)
            out.append({"index": len(self._calls) - 1, "id": call["id"], "type": "function",
                        "function": {"name": call["name"], "arguments": ""}})
            self._advance(call, text, out)
        return out

    def _advance(self, call: dict, text: str, out: list[dict]) -> None:
        call["end"] = _value_end(text, call["start"])
        upto = call["end"] if call["end"] is not None else len(text)
        piece = text[call["start"] + call["sent"]:upto]
        if piece:
            out.append({"index": self._calls.index(call), "function": {"arguments": piece}})
            call["sent"] += len(piece)

    def calls(self) -> list[dict]:
        """The finished calls, as OpenAI tool_calls; none when any is unfinished or its arguments no object."""
        out = []
        for c in self._calls:
            raw = self._text[c["start"]:c["end"]] if c["end"] is not None else ""
            try:
                if not isinstance(json.loads(raw), dict):
                    return []
            except ValueError:
                return []
            out.append({"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": raw}})
        return out


class Gate:
    """Streamed content of one reply: text that may be a tool call is held back until the reply is complete
    (Hermes: from `<tool_call>` on; Llama and Mistral: a reply opening with its call's JSON)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.filter = StopStringFilter([HERMES_OPEN]) if plan.mode == "auto" and plan.fmt == "hermes" else None
        self.state = "open" if plan.mode == "none" else "undecided"
        self.held = ""

    def feed(self, text: str) -> str:
        if self.plan.mode == "forced":
            return ""
        if self.filter is not None:
            return self.filter.feed(text)
        if self.state == "open":
            return text
        self.held += text
        if self.state == "call":
            return ""
        head = self.held.lstrip()
        if head.startswith(_OPENERS[self.plan.fmt]):
            self.state = "call"
            return ""
        if not head or any(o.startswith(head) for o in _OPENERS[self.plan.fmt]):
            return ""  # not telling yet
        self.state, out, self.held = "open", self.held, ""
        return out
