"""Conversation templates: messages -> prompt text, and messages -> (token ids, loss mask).

A template is data (camelid/templates/*.json): where the system message goes, each role's prefix and
suffix, where generation starts, BOS/EOS policy, stop strings and tokens, and how the model was
tokenized. Schema of one entry:

    bos, eos          token strings; BOS is prepended as an id, and either string inside template
                      text becomes its id, as does <FLM_FIX_TOKEN_n>. Message content that spells a
                      special token is tokenized as plain text, never as that token.
    system            {prefix, suffix, default, placement: start | first_user | last_user | none | drop,
                      always}: a system message the conversation gives is placed even when empty; without
                      one, the default, or (always) an empty block. last_user: before the final message
                      when it is a user message, else nowhere (Mistral v0.3). "{today}" in the prefix is
                      today's date as "07 Dec 2026" (Llama 3.2's strftime_now("%d %b %Y"))
    user              {prefix, first_prefix (first turn only, optional), suffix}
    assistant         {prefix, suffix (the trained end of turn), separator (untrained)}
    generation        where the model starts writing (default: assistant.prefix, which it must begin)
    preamble          fixed text before everything (fastllm's pre_prompt, EasyLM's chat_prepend_text)
    examples          a fixed example exchange after the system block (FastChat's one_shot), never trained
    end               text after a finished conversation's last reply (Baichuan2's closing EOS), trained
    strip             true: strip user/assistant contents (Meta's dialog rule); "all": system too; a role
                      name: that role's only
    tokenize          "whole": text between special ids is tokenized at once (a reply shares its
                      first token with the prompt, as in FastChat/HF); "fields": the prompt and
                      each reply are tokenized on their own (EasyLM's TextProcessor, Baichuan2)
    stop_strings, stop_tokens, match (model-name substrings), match_not (regexes on the lowered name
                      that rule the template out: a newer version of the family), aliases

The loss mask marks what the model must produce: everything after the generation prompt up to and
including the end-of-turn token. Token boundaries come from the tokenizer itself: a segment starts at
the first token where tokenizing the text before it stops agreeing with tokenizing the whole text,
so no offsets are guessed from string pieces (FastChat's "-2" bug).

Hugging Face jinja templates (`template_from_hf`) live in templates/hf.py and share the tokenization; the
registry, the choice of a model's template and the CLI commands in templates/registry.py.
"""
from __future__ import annotations

import argparse
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import CamelidError

ROLES = ("system", "user", "assistant")
_FLM_TOKEN = r"<FLM_FIX_TOKEN_(\d+)>"
_FLM_TOKEN_RE = re.compile(_FLM_TOKEN)


@dataclass
class Message:
    role: str
    content: str


# One piece of rendered text: (text, trained, literal). Literal text (message content) is never searched
# for BOS/EOS strings, so a user typing "</s>" gets no special id from the template's own rules.
Part = tuple[str, bool, bool]


def as_dicts(messages: Iterable[Message | dict]) -> list[dict[str, str]]:
    """Validate messages: known roles, string contents, an optional leading system message, then user and
    assistant turns alternating from the user."""
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role, content = (m.role, m.content) if isinstance(m, Message) else (
            (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None))
        if role not in ROLES or not isinstance(content, str):
            raise CamelidError(f"message {i + 1} {m!r}: role must be system, user or assistant and content a string")
        out.append({"role": role, "content": content})
    expected = "user"
    for i, m in enumerate(out):
        if m["role"] == "system":
            if i != 0:
                raise CamelidError(f"message {i + 1} is a system message; only the first message may be one")
            continue
        if m["role"] != expected:
            what = f"right after another {m['role']!r} message" if i and out[i - 1]["role"] == m["role"] else \
                "where a user message must come first"
            raise CamelidError(f"message {i + 1} is {m['role']!r} {what}: turns must alternate user, assistant, user ...")
        expected = "assistant" if expected == "user" else "user"
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
        """Token ids and a mask that is True on each assistant reply and its end-of-turn token.
        continue_final_message: end right after the last (assistant) message's text, for the model to go on."""
        ids: list[int] = []
        mask: list[bool] = []
        bos = self.bos_token_text()
        if bos is not None:
            ids.append(_token_id(tokenizer, bos, self.name))
            mask.append(False)
        parts = self._parts(messages, add_generation_prompt, continue_final_message)
        items = _split_ids(parts, self.id_tokens(), tokenizer, self.name)
        chunk: list[tuple[str, bool]] = []
        for item, trained, literal in items:
            if isinstance(item, int):
                _encode_chunk(chunk, tokenizer, ids, mask)
                chunk = []
                ids.append(item)
                mask.append(trained)
            elif literal and (plain := _as_plain_text(tokenizer, item)):
                # Message content that spells a special token ("<|im_end|>", "</s>") is text, never that
                # token: a user cannot end a turn or forge a role by typing it. (HF templates, which
                # render content and markup as one string, cannot tell them apart.)
                _encode_chunk(chunk, tokenizer, ids, mask)
                chunk = []
                ids.extend(plain)
                mask.extend([trained] * len(plain))
            else:
                if self.tokenize_mode == "fields" and chunk and chunk[-1][1] != trained:
                    _encode_chunk(chunk, tokenizer, ids, mask)
                    chunk = []
                chunk.append((item, trained))
        _encode_chunk(chunk, tokenizer, ids, mask)
        return ids, mask

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
    try:
        plain = tokenizer.encode(text, special=False)
    except TypeError:
        return None
    return plain if plain != tokenizer.encode(text) else None


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


def _encode_chunk(chunk: list[tuple[str, bool]], tokenizer: Any, ids: list[int], mask: list[bool]) -> None:
    """Tokenize one run of text at once; each segment owns the tokens from the first one that tokenizing the
    text before it alone does not produce (a token straddling a boundary belongs to what follows)."""
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


class Template(BaseTemplate):
    """A conversation template described by data (see the module docstring for the fields)."""

    def __init__(self, spec: dict[str, Any]):
        try:
            self.name: str = spec["name"]
            self.description: str = spec.get("description", "")
            self.reference: str = spec.get("reference", "")
            self.aliases: list[str] = list(spec.get("aliases", []))
            self.match: list[str] = [m.lower() for m in spec.get("match", [])]
            self.match_not: list[str] = list(spec.get("match_not", []))
            self.bos: str | None = spec.get("bos")
            self.eos: str | None = spec.get("eos")
            self.preamble: str = spec.get("preamble", "")
            self.examples: list[dict[str, str]] = as_dicts(spec.get("examples", []))
            self.end: str = spec.get("end", "")
            self.system: dict[str, Any] = {"prefix": "", "suffix": "", "placement": "start", "always": False,
                                           "default": None, **spec.get("system", {})}
            self.user: dict[str, str] = {"prefix": "", "suffix": "", **spec["user"]}
            self.assistant: dict[str, str] = {"prefix": "", "suffix": "", "separator": "", **spec["assistant"]}
            self.generation: str = spec.get("generation", self.assistant["prefix"])
            self.strip = spec.get("strip", False)
            self.tokenize_mode = spec.get("tokenize", "whole")
            self._stop_strings: list[str] = list(spec.get("stop_strings", []))
            self.stop_tokens: list[str] = list(spec.get("stop_tokens", []))
        except (KeyError, TypeError) as e:
            raise CamelidError(f"template spec {spec.get('name', spec) if isinstance(spec, dict) else spec!r} "
                               f"is missing or misuses {e}") from None
        if not self.assistant["prefix"].startswith(self.generation):
            raise CamelidError(f"template {self.name}: generation {self.generation!r} must begin the assistant "
                               f"prefix {self.assistant['prefix']!r}")
        if self.system["placement"] not in ("start", "first_user", "last_user", "none", "drop"):
            raise CamelidError(f"template {self.name}: system placement must be start, first_user, last_user, "
                               "none or drop")
        if self.tokenize_mode not in ("whole", "fields"):
            raise CamelidError(f"template {self.name}: tokenize must be 'whole' or 'fields'")

    @property
    def stop_strings(self) -> list[str]:
        return list(dict.fromkeys(self._stop_strings + self.stop_tokens))

    def stop_token_ids(self, tokenizer: Any) -> set[int]:
        found = {tokenizer.token_to_id(s) for s in self.stop_tokens}
        return {i for i in found if i is not None} | super().stop_token_ids(tokenizer)

    def bos_token_text(self) -> str | None:
        return self.bos

    def id_tokens(self) -> list[str]:
        return [t for t in (self.bos, self.eos) if t]

    def _content(self, message: dict[str, str]) -> str:
        text = message["content"]
        role = message["role"]
        if self.strip == "all" or (self.strip is True and role != "system") or self.strip == role:
            text = text.strip()
        return text

    def parts(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Part]:
        out: list[Part] = []

        def add(text: str, trained: bool = False, literal: bool = False) -> None:
            if text:
                out.append((text, trained, literal))

        # A system message the conversation gives is placed even when empty (as Meta's and the HF templates
        # do); without one the template's default is used, or with `always` an empty block.
        system = self.system["default"]
        if messages and messages[0]["role"] == "system":
            system, messages = self._content(messages[0]), messages[1:]
            if self.system["placement"] == "none":
                raise CamelidError(f"the {self.name} template has no place for a system message; leave it out")
        has_system = self.system["placement"] not in ("none", "drop") and (system is not None or self.system["always"])
        prefix = self.system["prefix"].replace("{today}", time.strftime("%d %b %Y"))
        system_parts = [(prefix, False, False), (system or "", False, True),
                        (self.system["suffix"], False, False)] if has_system else []
        add(self.preamble)
        if self.system["placement"] == "start":
            for p in system_parts:
                add(*p)
        gen, rest = self.generation, self.assistant["prefix"][len(self.generation):]
        for m in self.examples:
            add(self.user["prefix"] if m["role"] == "user" else self.assistant["prefix"])
            add(m["content"], literal=True)
            add(self.user["suffix"] if m["role"] == "user" else self.assistant["suffix"] + self.assistant["separator"])
        for i, m in enumerate(messages):
            if m["role"] == "user":
                first = i == 0
                add(self.user.get("first_prefix", self.user["prefix"]) if first else self.user["prefix"])
                last = i == len(messages) - 1
                if last and self.system["placement"] == "last_user" and system_parts:
                    for p in system_parts:
                        add(*p)
                    add(self._content(m), literal=True)
                elif first and self.system["placement"] == "first_user" and system_parts:
                    # Meta strips the system block and the first instruction as one string.
                    combined = "".join(p[0] for p in system_parts) + m["content"]
                    add(combined.strip() if self.strip else combined, literal=True)
                else:
                    add(self._content(m), literal=True)
                add(self.user["suffix"])
            else:
                add(gen)
                # What follows the generation prompt is the model's to write: trained.
                add(rest, trained=True)
                add(self._content(m), trained=True, literal=True)
                add(self.assistant["suffix"], trained=True)
                add(self.assistant["separator"])
        if add_generation_prompt:
            add(gen)
        elif messages and messages[-1]["role"] == "assistant":
            add(self.end, trained=True)
        return out


def template_from_fastllm(pre_prompt: str, user_role: str, bot_role: str, history_sep: str, *,
                          name: str = "fastllm", description: str = "a fastllm prompt config") -> Template:
    """fastllm's prompt rule: pre_prompt + Σ(user_role + q + bot_role + a + history_sep) + user_role + q_N +
    bot_role; <FLM_FIX_TOKEN_n> is token id n; system messages are dropped, as fastllm does. fastllm
    itself stops only at EOS; the user role (when it is more than whitespace) is added as a stop string,
    so a model that goes on to write the next user turn is cut there."""
    marker = _FLM_TOKEN_RE.sub("", user_role).strip()
    return Template({"name": name, "description": description, "preamble": pre_prompt,
                     "system": {"placement": "drop"}, "user": {"prefix": user_role},
                     "assistant": {"prefix": bot_role, "separator": history_sep},
                     "stop_strings": [marker] if marker else []})


def template_from_lmserver(chat_prepend_text: str, chat_user_prefix: str, chat_user_suffix: str,
                           chat_lm_prefix: str, chat_lm_suffix: str, *, name: str = "lmserver") -> Template:
    """EasyLM LMServer's chat flags: context + user_prefix + prompt + user_suffix + lm_prefix, the reply,
    then lm_suffix (the end of turn, trained); chat_prepend_text starts every prompt."""
    return Template({"name": name, "description": "EasyLM LMServer chat flags", "preamble": chat_prepend_text,
                     "system": {"placement": "drop"},
                     "user": {"prefix": chat_user_prefix, "suffix": chat_user_suffix},
                     "assistant": {"prefix": chat_lm_prefix, "suffix": chat_lm_suffix}})


def template_from_hf(chat_template: str, *, bos_token: str | None = None, eos_token: str | None = None,
                     name: str = "hf") -> BaseTemplate:
    """A Hugging Face chat template (jinja2, sandboxed) bound to its BOS/EOS strings."""
    from .templates.hf import HFTemplate
    return HFTemplate(chat_template, name=name, bos_token=bos_token, eos_token=eos_token)


# The registry (templates/registry.py) builds on this module, so these entry points import it when called.
def get_template(name: str) -> Template:
    """A built-in template by name or alias; an unknown name is an error listing close names."""
    from .templates.registry import get_template as get
    return get(name)


def list_templates() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in template."""
    from .templates.registry import list_templates as listing
    return listing()


def resolve_template(*, explicit: str | None, model_dir: Path | None, embedded: str | None,
                     model_name: str | None, tokenizer: Any) -> tuple[BaseTemplate, str | None]:
    """The template a model gets: explicit name > camelid.json > embedded HF/GGUF template > name match
    (with a notice to print). Nothing matching is an error, never a silent fallback."""
    from .templates.registry import resolve_template as resolve
    return resolve(explicit=explicit, model_dir=model_dir, embedded=embedded, model_name=model_name,
                   tokenizer=tokenizer)


def cmd_templates(args: argparse.Namespace) -> None:
    """List the built-in conversation templates with one-line descriptions."""
    from .templates.registry import cmd_templates as command
    command(args)


def cmd_prompt(args: argparse.Namespace) -> None:
    """Print the prompt a template makes of a JSON list of {"role", "content"} messages (or, with --ids,
    its token ids and loss mask as JSON)."""
    from .templates.registry import cmd_prompt as command
    command(args)


__all__ = ["Message", "Template", "BaseTemplate", "get_template", "list_templates", "resolve_template",
           "template_from_hf", "template_from_fastllm", "template_from_lmserver", "cmd_templates", "cmd_prompt"]
