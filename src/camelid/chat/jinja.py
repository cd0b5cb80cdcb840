"""A Hugging Face chat template (jinja2) as a camelid template.

Rendered in jinja2's ImmutableSandboxedEnvironment (a template from a downloaded model is untrusted
code), with the globals transformers gives it: bos_token, eos_token, raise_exception, strftime_now,
add_generation_prompt. Token ids are the tokenization of the whole rendered string, as
`apply_chat_template` does. A prompt is one rendering of the whole conversation; the loss mask comes from
rendering growing conversations (training only).
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterable

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import CamelidError
from .render import BaseTemplate, Message, Part, as_dicts, check_generation
from .tools import detect, expand, normalize

# Turn-end markers of common templates; the first one after a reply closes what the model is trained to write.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|EOT|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def _strftime_now(fmt: str) -> str:
    return time.strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # As transformers overrides jinja's: no HTML escaping, keys in their order, non-ASCII kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise CamelidError(f"the chat template refused the conversation: {message}")


class HFTemplate(BaseTemplate):
    def __init__(self, source: str, *, name: str = "hf", bos_token: str | None = None, eos_token: str | None = None):
        self.name, self.description = name, "the model's own Hugging Face chat template"
        self.source = source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        # trim_blocks/lstrip_blocks: the settings transformers renders chat templates with.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson  # transformers' tojson: tools and calls are written with it
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now  # transformers gives it: Llama-3.2 dates its system block
        try:
            self._jinja = env.from_string(source)
        except TemplateError as e:
            raise CamelidError(f"the chat template does not parse: {e}") from None
        markers = [m for m in END_MARKERS if m in source]
        if self.eos_token and self.eos_token not in markers and ("eos_token" in source or self.eos_token in source):
            markers.append(self.eos_token)
        self._markers = markers
        self.tool_format = detect(source)  # None: the template ignores tools; they are written as hermes text

    @property
    def stop_strings(self) -> list[str]:
        return list(self._markers)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        extra = {}
        if self.tool_format is None:
            if self.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
                messages = expand("hermes", messages, self.tools, None)
        else:
            messages = normalize(self.tool_format, messages)  # Mistral's template refuses other call ids
            extra = {"tools": self.tools} if self.tools else {}
        try:
            return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError as e:
            raise CamelidError(f"the chat template failed: {e}") from None

    def _trained_end(self, delta: str, content: str) -> int:
        """Where the reply's end-of-turn marker ends inside the text an assistant message adds."""
        start = delta.find(content.strip()) if content.strip() else 0
        after = max(start, 0) + len(content.strip())
        found = [(delta.find(m, after), m) for m in self._markers if delta.find(m, after) >= 0]
        if not found:
            return len(delta)
        pos, marker = min(found)
        return pos + len(marker)

    def prompt_parts(self, messages: Iterable[Message | dict], add_generation_prompt: bool,
                     continue_final_message: bool) -> list[Part]:
        # The growing renderings `parts` makes add up to this one rendering; they are there only to find
        # where each reply starts and ends, which a prompt does not need.
        if continue_final_message:  # cut after the final reply's text: `parts` knows where it is
            return super().prompt_parts(messages, add_generation_prompt, continue_final_message)
        msgs = as_dicts(messages)
        check_generation(msgs, add_generation_prompt)
        text = self._render(msgs, add_generation_prompt) if msgs else ""
        return [(text, False, False)] if text else []

    def parts(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Part]:
        out: list[Part] = []
        done = ""

        def extend(text: str) -> str:
            if not text.startswith(done):
                raise CamelidError(f"the {self.name} chat template does not render conversations incrementally, "
                                   "so camelid cannot tell the replies apart; pass --template NAME")
            return text[len(done):]

        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                head = self._render(messages[:i], True)
                out.append((extend(head), False, False))
                done = head
                text = self._render(messages[: i + 1], False)
                delta = extend(text)
                cut = self._trained_end(delta, message["content"])
                out += [(delta[:cut], True, False), (delta[cut:], False, False)]
            else:
                text = self._render(messages[: i + 1], False)
                out.append((extend(text), False, False))
            done = text
        if add_generation_prompt:
            out.append((extend(self._render(messages, True)), False, False))
        return [p for p in out if p[0]]


def template_from_hf(chat_template: str, *, bos_token: str | None = None, eos_token: str | None = None,
                     name: str = "hf") -> BaseTemplate:
    """A Hugging Face chat template (jinja2, sandboxed) bound to its BOS/EOS strings."""
    return HFTemplate(chat_template, name=name, bos_token=bos_token, eos_token=eos_token)
