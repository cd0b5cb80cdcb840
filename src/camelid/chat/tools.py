"""Tool-calling formats of the model families: how tools, calls and results are written into a prompt by
the templates camelid describes as data (a model's own jinja template writes them itself: `detect` names
its format, so that replies are read back in it).

- hermes: Qwen2.5's (and NousResearch Hermes 2 Pro's) `<tool_call>` JSON. Tools go at the end of the
  system message, calls are `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` lines, results a
  user turn of `<tool_response>` blocks. Templates with no format of their own get this one, as text.
- llama3: Llama-3.1/3.2/3.3's JSON tool calling. `Environment: ipython` heads the system block, tools are
  listed (indented JSON) in the first user message, a call is `{"name": ..., "parameters": {...}}`, and
  results come back in the `ipython` role, JSON-encoded as the official template writes them.
- mistral: Mistral v0.3's control tokens. `[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]` before the last user
  turn, calls `[TOOL_CALLS] [{"name", "arguments", "id"}]</s>`, results
  `[TOOL_RESULTS] {"content": ..., "call_id": ...}[/TOOL_RESULTS]`; call ids are 9 letters or digits.

Messages are dicts: role, content, and for tools `tool_calls` ([{id, type, function: {name, arguments}}],
arguments a dict, as transformers' templates take them) and `tool_call_id`. `expand` turns them into what a
data template renders: system/user/assistant messages, plus `parts` messages (verbatim pieces, special tokens
included) for what has no role of its own. Imports no torch.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from typing import Any

from ..errors import CamelidError

FORMATS = ("hermes", "llama3", "mistral")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_HERMES_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
_LLAMA_ASK = ("Given the following functions, please respond with a JSON for a function call with its proper "
              "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
              "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")
LLAMA_IPYTHON = "<|start_header_id|>ipython<|end_header_id|>\n\n"
LLAMA_ENVIRONMENT = "Environment: ipython\n"
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
_ALNUM = string.ascii_letters + string.digits


def dump(obj: Any, indent: int | None = None) -> str:
    """JSON as transformers' `tojson` writes it (no ASCII escaping, keys in their order)."""
    return json.dumps(obj, ensure_ascii=False, indent=indent)


def detect(source: str) -> str | None:
    """The tool format a jinja chat template writes natively, or None (it ignores tools)."""
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if HERMES_OPEN in source:
        return "hermes"
    if "ipython" in source and '"parameters"' in source:
        return "llama3"
    return None


def new_call_id(fmt: str) -> str:
    """An id for a call the model made: Mistral's templates insist on 9 letters or digits."""
    if fmt == "mistral":
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def mistral_id(call_id: str | None) -> str:
    """A client's call id as Mistral's format takes it: kept when it is 9 letters or digits, else a stable
    9-character digest, so a call and its result keep matching."""
    if call_id and _MISTRAL_ID.fullmatch(call_id):
        return call_id
    return hashlib.sha256((call_id or "").encode("utf-8")).hexdigest()[:9]


def normalize(fmt: str, messages: list[dict]) -> list[dict]:
    """Messages with call ids the format accepts (Mistral's: 9 alphanumerics)."""
    if fmt != "mistral":
        return messages
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "id": mistral_id(c.get("id"))} for c in m["tool_calls"]]
        if m.get("role") == "tool":
            m["tool_call_id"] = mistral_id(m.get("tool_call_id"))
        out.append(m)
    return out


def _calls(m: dict) -> list[tuple[str, Any, str | None]]:
    return [(c["function"]["name"], c["function"]["arguments"], c.get("id")) for c in m.get("tool_calls") or []]


def expand(fmt: str, messages: list[dict], tools: list[dict] | None, default_system: str | None) -> list[dict]:
    """Messages with tools, calls and results written in `fmt`, for a template described by data."""
    if fmt not in FORMATS:
        raise CamelidError(f"unknown tool format {fmt!r} (one of {', '.join(FORMATS)})")
    return {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral}[fmt](messages, tools, default_system)


def _hermes(messages: list[dict], tools: list[dict] | None, default_system: str | None) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [f"{HERMES_OPEN}\n{{\"name\": {dump(name)}, \"arguments\": {dump(args)}}}\n{HERMES_CLOSE}"
                     for name, args, _ in _calls(m)]
            text = [m["content"]] if m.get("content") else []
            out.append({"role": "assistant", "content": "\n".join(text + calls)})
        elif m["role"] == "tool":  # consecutive results share one user turn, as Qwen2.5 writes them
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "results": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        listing = _HERMES_HEAD + "".join("\n" + dump(t) for t in tools) + _HERMES_TAIL
        if out and out[0]["role"] == "system":
            out[0]["content"] += "\n\n" + listing
        else:
            out.insert(0, {"role": "system", "content": ((default_system or "") + "\n\n" + listing).lstrip("\n")})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _llama3(messages: list[dict], tools: list[dict] | None, default_system: str | None) -> list[dict]:
    out: list[dict] = []
    listed = not tools
    for m in messages:
        if m["role"] == "user" and not listed:  # tools go into the first user message, which is trimmed
            listing = _LLAMA_ASK + "".join(dump(t, indent=4) + "\n\n" for t in tools)
            out.append({"role": "user", "content": listing + m["content"].strip()})
            listed = True
        elif m["role"] == "assistant" and m.get("tool_calls"):
            # One call per turn in Meta's template; several are joined by "; " as Llama writes parallel calls.
            text = "; ".join(f"{{\"name\": {dump(name)}, \"parameters\": {dump(args)}}}" for name, args, _ in _calls(m))
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append({"role": "tool", "parts": [(LLAMA_IPYTHON, False), (dump(m["content"]), True),
                                                  ("<|eot_id|>", False)]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools and not listed:
        raise CamelidError("the Llama tool format lists tools in the first user message: the conversation has none")
    return out


def _mistral_listing(tools: list[dict]) -> str:
    # Mistral's template writes each function's fields itself: strings as they are, other values as JSON.
    items = []
    for t in tools:
        fields = [f'"{k}": "{v}"' if isinstance(v, str) else f'"{k}": {dump(v)}'
                  for k, v in t["function"].items() if k != "return"]
        items.append('{"type": "function", "function": {' + ", ".join(fields) + "}}")
    return "[" + ", ".join(items) + "]"


def _mistral(messages: list[dict], tools: list[dict] | None, default_system: str | None) -> list[dict]:
    messages = normalize("mistral", messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    out: list[dict] = []
    for i, m in enumerate(messages):
        if i == last_user and tools:
            out.append({"role": "markup", "parts": [("[AVAILABLE_TOOLS] ", False), (_mistral_listing(tools), True),
                                                    ("[/AVAILABLE_TOOLS]", False)]})
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": name, "arguments": args, "id": cid} for name, args, cid in _calls(m)]
            out.append({"role": "assistant", "parts": [("[TOOL_CALLS] ", False), (dump(calls), True)]})
        elif m["role"] == "tool":
            # The content goes in as it is (the template's `content|string`), not as a JSON string.
            body = f'{{"content": {m["content"]}, "call_id": "{m["tool_call_id"]}"}}'
            out.append({"role": "tool",
                        "parts": [("[TOOL_RESULTS] ", False), (body, True), ("[/TOOL_RESULTS]", False)]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out
