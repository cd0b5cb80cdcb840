"""Chat templates: messages -> prompt text / (token ids, loss mask).

This first version renders the model's own Hugging Face chat template (jinja2, sandboxed), the
template every GGUF and most HF folders carry. The registry of named templates (Koala, Vicuna,
Llama-2 ...) is issue 4.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import CamelidError


@dataclass
class Message:
    role: str
    content: str


def _as_dicts(messages: Iterable[Message | dict]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, Message) else (m.get("role"), m.get("content"))
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise CamelidError(f"bad message {m!r}: role must be system/user/assistant and content a string")
        out.append({"role": role, "content": content})
    return out


def _raise(message: str) -> None:
    raise CamelidError(f"the chat template refused the conversation: {message}")


class Template:
    """A Hugging Face chat template bound to its special-token strings."""

    def __init__(self, source: str, *, name: str = "hf", bos_token: str | None = None, eos_token: str | None = None):
        self.name, self.description = name, "the model's own Hugging Face chat template"
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._jinja = env.from_string(source)
        except TemplateError as e:
            raise CamelidError(f"the chat template does not parse: {e}") from None
        # Turn-end markers the template writes are where generation must stop.
        self.stop_strings = [s for s in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>") if s in source]

    def render_text(self, messages: Iterable[Message | dict], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._jinja.render(messages=_as_dicts(messages), add_generation_prompt=add_generation_prompt,
                                      bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise CamelidError(f"the chat template failed: {e}") from None

    def render_ids(self, messages: Iterable[Message | dict], tokenizer: Any, *,
                   add_generation_prompt: bool = True) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered prompt and a mask marking each assistant reply and its end-of-turn token."""
        messages = _as_dicts(messages)
        ids: list[int] = []
        mask: list[bool] = []
        done = ""
        # Render growing prefixes; the text each message adds is tokenized on its own, so the mask is exact
        # at the boundaries the template itself draws.
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                head = self.render_text(messages[:i], add_generation_prompt=True)
                self._extend(ids, mask, tokenizer, head[len(done):], False)
                done = head
            text = self.render_text(messages[: i + 1], add_generation_prompt=False)
            if not text.startswith(done):
                raise CamelidError("the chat template does not render conversations incrementally")
            self._extend(ids, mask, tokenizer, text[len(done):], message["role"] == "assistant")
            done = text
        if add_generation_prompt:
            text = self.render_text(messages, add_generation_prompt=True)
            self._extend(ids, mask, tokenizer, text[len(done):], False)
        return ids, mask

    @staticmethod
    def _extend(ids: list[int], mask: list[bool], tokenizer: Any, text: str, trained: bool) -> None:
        if text:
            new = tokenizer.encode(text)
            ids.extend(new)
            mask.extend([trained] * len(new))

    def stop_token_ids(self, tokenizer: Any) -> set[int]:
        found = {tokenizer.token_to_id(s) for s in self.stop_strings}
        return {i for i in found if i is not None}


def template_from_hf(chat_template: str, *, bos_token: str | None = None, eos_token: str | None = None) -> Template:
    return Template(chat_template, bos_token=bos_token, eos_token=eos_token)


def resolve_template(*, explicit: str | None, model_dir: Path | None, embedded: str | None, model_name: str | None,
                     tokenizer: Any) -> tuple[Template, str | None]:
    """The template a model gets: its embedded HF/GGUF chat template; never a silent guess."""
    if explicit:
        raise CamelidError(f"no built-in template named {explicit!r} yet; this model's own template is used "
                           "when --template is left out")
    if embedded:
        return template_from_hf(embedded, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token), None
    raise CamelidError(f"{model_name or model_dir}: the model carries no chat template")
