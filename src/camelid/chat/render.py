"""Messages -> prompt text, and messages -> (token ids, loss mask): what every template shares.

A template renders a validated conversation into parts (text, trained, literal); this module turns parts
into text or token ids. The loss mask marks what the model must produce: everything after the generation
prompt up to and including the end-of-turn token. Token boundaries come from the tokenizer itself: a
segment starts at the first token where tokenizing the text before it stops agreeing with tokenizing the
whole text, so no offsets are guessed from string pieces (FastChat's "-2" bug).

The templates themselves: spec.py (described by data), jinja.py (Hugging Face chat templates); the
named ones and the choice of a model's template: registry.py.
"""
from __future__ import annotations

import copy
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import CamelidError

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "markup")  # a tool's result; verbatim markup a tool format places (chat/tools.py)
_TOOL_KEYS = ("tool_calls", "tool_call_id", "parts")
_FLM_TOKEN = r"<FLM_FIX_TOKEN_(\d+)>"
FLM_TOKEN_RE = re.compile(_FLM_TOKEN)


@dataclass
class Message:
    role: str
    content: str


# One piece of rendered text: (text, trained, literal). Literal text (message content) is never searched
# for BOS/EOS strings, so a user typing "</s>" gets no special id from the template's own rules.
Part = tuple[str, bool, bool]


def as_dicts(messages: Iterable[Message | dict]) -> list[dict[str, Any]]:
    """Validate messages: known roles, string contents, an optional leading system message, then user and
    assistant turns alternating from the user. Tool results (role "tool") follow an assistant turn (or each
    other), and the model or the user speaks next; a message's `tool_calls` and `tool_call_id` are kept, as are
    the `parts` chat/tools.py writes (verbatim pieces for what has no role of its own: role "markup")."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role, content = (m.role, m.content) if isinstance(m, Message) else (
            (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None))
        verbatim = isinstance(m, dict) and ("parts" in m or (content is None and bool(m.get("tool_calls"))))
        if role not in ROLES + TOOL_ROLES or not (isinstance(content, str) or verbatim) or \
                (role == "markup" and not verbatim):
            raise CamelidError(f"message {i + 1} {m!r}: role must be system, user or assistant (or tool, answering "
                               "an assistant's call) and content a string")
        out.append({"role": role, "content": content or "",
                    **{k: m[k] for k in _TOOL_KEYS if isinstance(m, dict) and m.get(k) is not None}})
    expected: str | None = "user"
    for i, m in enumerate(out):
        if m["role"] == "system":
            if i != 0:
                raise CamelidError(f"message {i + 1} is a system message; only the first message may be one")
            continue
        if m["role"] == "markup":
            continue
        if m["role"] == "tool":
            if i == 0 or out[i - 1]["role"] not in ("assistant", "tool"):
                raise CamelidError(f"message {i + 1} is a tool result with no assistant turn before it: role must be "
                                   "system, user or assistant, or tool right after an assistant's call")
            expected = None  # the model answers the results, or the user goes on
            continue
        if expected is not None and m["role"] != expected:
            what = f"right after another {m['role']!r} message" if i and out[i - 1]["role"] == m["role"] else \
                "where a user message must come first"
            raise CamelidError(f"message {i + 1} is {m['role']!r} {what}: turns must alternate user, assistant, user ...")
        expected = "assistant" if m["role"] == "user" else "user"
    return out


def check_generation(messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    # A system message alone may open a reply too (OpenAI and the HF templates accept it).
    if add_generation_prompt and (not messages or messages[-1]["role"] == "assistant"):
        raise CamelidError("a generation prompt needs the conversation to end with a user message "
                           "(use --no-generation-prompt to render a finished conversation)")


def cut_after_final(parts: list[Part], messages: list[dict[str, str]]) -> list[Part]:
    """The rendering of a conversation cut right after its final assistant message's text, so the model
    continues that message (transformers' `continue_final_message`): its end-of-turn and what follows go."""
    if not messages or messages[-1]["role"] != "assistant":
        raise CamelidError("continuing the final message needs the conversation to end with an assistant message")
    final = messages[-1]["content"].strip()
    text = "".join(p[0] for p in parts)
    end = text.rfind(final) + len(final) if final else -1
    if final and end < len(final):
        raise CamelidError("the final assistant message does not appear in the rendered conversation")
    if not final:  # an empty message: cut where its turn's trained text begins (the reply would go there)
        trained = [i for i, p in enumerate(parts) if p[1]]
        last_run = trained[-1] if trained else len(parts) - 1
        while last_run > 0 and parts[last_run - 1][1]:
            last_run -= 1
        end = sum(len(p[0]) for p in parts[:last_run])
    out, pos = [], 0
    for piece, trained, literal in parts:
        if pos >= end:
            break
        out.append((piece[:end - pos], trained, literal))
        pos += len(piece)
    return [p for p in out if p[0]]


class BaseTemplate(ABC):
    """What every template offers: text, ids with a loss mask, stop rules."""

    name: str
    description: str
    tokenize_mode = "whole"
    tool_format: str | None = None  # how the template writes tools, calls and results (chat/tools.py)
    tools: list[dict] | None = None  # the tools a prompt offers: set on a copy by `with_tools`

    def with_tools(self, tools: list[dict] | None) -> "BaseTemplate":
        """This template offering `tools` (OpenAI function definitions) in its prompts: a shallow copy, so
        one request's tools never reach another's."""
        view = copy.copy(self)
        view.tools = list(tools) if tools else None
        return view

    @abstractmethod
    def parts(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Part]:
        """The rendered pieces of a validated conversation: (text, trained, literal)."""

    def id_tokens(self) -> list[str]:
        """Token strings in template text that become ids (and split the text there)."""
        return []

    def bos_token_text(self) -> str | None:
        return None

    @property
    def stop_strings(self) -> list[str]:
        return []

    def _parts(self, messages: Iterable[Message | dict], add_generation_prompt: bool,
               continue_final_message: bool) -> list[Part]:
        msgs = as_dicts(messages)
        if continue_final_message:
            return cut_after_final(self.parts(msgs, False), msgs)
        check_generation(msgs, add_generation_prompt)
        return self.parts(msgs, add_generation_prompt)

    def render_text(self, messages: Iterable[Message | dict], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        """The prompt text. A BOS the template adds as an id at the very start is not part of it (as in
        FastChat: the tokenizer adds it); `render_ids` has it."""
        return "".join(text for text, _, _ in self._parts(messages, add_generation_prompt, continue_final_message))

    def render_ids(self, messages: Iterable[Message | dict], tokenizer: Any, *, add_generation_prompt: bool = True,
                   continue_final_message: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids and a mask that is True on each assistant reply and its end-of-turn token (for training;
        a prompt to generate from needs only `prompt_ids`, which is much cheaper).
        continue_final_message: end right after the last (assistant) message's text, for the model to go on."""
        mask: list[bool] = []
        ids = self._encode(self._parts(messages, add_generation_prompt, continue_final_message), tokenizer, mask)
        return ids, mask

    def prompt_ids(self, messages: Iterable[Message | dict], tokenizer: Any, *, add_generation_prompt: bool = True,
                   continue_final_message: bool = False) -> list[int]:
        """The prompt's token ids, rendered once and encoded once: what generation and serving need. Equal to
        `render_ids(...)[0]`; the loss mask's work (tokenizing every segment's prefix again, and for jinja
        templates rendering every prefix of the conversation) is left out."""
        return self._encode(self.prompt_parts(messages, add_generation_prompt, continue_final_message), tokenizer,
                            None)

    def prompt_parts(self, messages: Iterable[Message | dict], add_generation_prompt: bool,
                     continue_final_message: bool) -> list[Part]:
        """The parts `prompt_ids` encodes. A template may render them more cheaply than `parts` when it
        knows its trained flags are not needed (they still split the text in "fields" tokenization)."""
        return self._parts(messages, add_generation_prompt, continue_final_message)

    def _encode(self, parts: list[Part], tokenizer: Any, mask: list[bool] | None) -> list[int]:
        """Token ids of rendered parts; the loss mask is appended to `mask` unless it is None."""
        ids: list[int] = []

        def flush(chunk: list[tuple[str, bool]]) -> None:
            _encode_chunk(chunk, tokenizer, ids, mask)
            chunk.clear()

        def add(new: list[int], trained: bool) -> None:
            ids.extend(new)
            if mask is not None:
                mask.extend([trained] * len(new))

        bos = self.bos_token_text()
        if bos is not None:
            add([_token_id(tokenizer, bos, self.name)], False)
        chunk: list[tuple[str, bool]] = []
        for item, trained, literal in _split_ids(parts, self.id_tokens(), tokenizer, self.name):
            if isinstance(item, int):
                flush(chunk)
                add([item], trained)
            elif literal and (plain := _as_plain_text(tokenizer, item)):
                # Message content that spells a special token ("<|im_end|>", "</s>") is text, never that
                # token: a user cannot end a turn or forge a role by typing it. (HF templates, which
                # render content and markup as one string, cannot tell them apart.)
                flush(chunk)
                add(plain, trained)
            else:
                if self.tokenize_mode == "fields" and chunk and chunk[-1][1] != trained:
                    flush(chunk)
                chunk.append((item, trained))
        flush(chunk)
        return ids

    def stop_token_ids(self, tokenizer: Any) -> set[int]:
        found = {tokenizer.token_to_id(s) for s in self.stop_strings}
        return {i for i in found if i is not None}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def _token_id(tokenizer: Any, token: str, name: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise CamelidError(f"the {name} template needs the token {token!r}, which this tokenizer does not have; "
                           "choose the template made for this model (camelid templates)")
    return i


def _as_plain_text(tokenizer: Any, text: str) -> list[int] | None:
    """The ids of `text` read as plain text, when reading it with special tokens would differ (it spells
    one); None otherwise, and for tokenizers without that switch."""
    full = tokenizer.encode(text)
    is_special = getattr(tokenizer, "is_special", None)
    if is_special is not None and not any(is_special(i) for i in full):
        return None  # spelling a special token gives its id: without one, both readings agree (one encoding saved)
    try:
        plain = tokenizer.encode(text, special=False)
    except TypeError:
        return None
    return plain if plain != full else None


def _split_ids(parts: list[Part], tokens: list[str], tokenizer: Any,
               name: str) -> list[tuple[str | int, bool, bool]]:
    """Template text cut at BOS/EOS strings and <FLM_FIX_TOKEN_n>, which become token ids; items are
    (text or id, trained, literal)."""
    alternatives = [re.escape(t) for t in sorted(set(tokens), key=len, reverse=True)] + [_FLM_TOKEN]
    pattern = re.compile("(" + "|".join(alternatives) + ")")
    out: list[tuple[str | int, bool, bool]] = []
    for text, trained, literal in parts:
        if literal:
            if text:
                out.append((text, trained, True))
            continue
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], trained, False))
            out.append((int(m.group(2)) if m.group(2) else _token_id(tokenizer, m.group(1), name), trained, False))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], trained, False))
    return out


def _encode_chunk(chunk: list[tuple[str, bool]], tokenizer: Any, ids: list[int], mask: list[bool] | None) -> None:
    """Tokenize one run of text at once; each segment owns the tokens from the first one that tokenizing the
    text before it alone does not produce (a token straddling a boundary belongs to what follows). Without
    a mask to fill, the one encoding is all."""
    if mask is None:
        text = "".join(t for t, _ in chunk)
        if text:
            ids.extend(tokenizer.encode(text))
        return
    merged: list[list] = []
    for text, trained in chunk:
        if merged and merged[-1][1] == trained:
            merged[-1][0] += text
        elif text:
            merged.append([text, trained])
    if not merged:
        return
    text = "".join(t for t, _ in merged)
    full = tokenizer.encode(text)
    starts, pos = [], 0
    for t, _ in merged:
        if pos == 0:
            starts.append(0)
        else:
            head = tokenizer.encode(text[:pos])
            n = 0
            while n < min(len(head), len(full)) and head[n] == full[n]:
                n += 1
            starts.append(max(n, starts[-1]))
        pos += len(t)
    ends = starts[1:] + [len(full)]
    ids.extend(full)
    for (_, trained), a, b in zip(merged, starts, ends):
        mask.extend([trained] * (b - a))
