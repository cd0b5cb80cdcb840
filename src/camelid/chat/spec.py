"""Templates described by data: the JSON `Template`, and the fastllm and EasyLM LMServer adapters.

A template is data (camelid/templates/builtin.json): where the system message goes, each role's prefix and
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
    tools             {format: hermes | llama3 | mistral (chat/tools.py; default hermes), system_prefix: the
                      system prefix when tools are offered (Llama's "Environment: ipython" line)}
"""
from __future__ import annotations

import time
from typing import Any

from ..errors import CamelidError
from .render import FLM_TOKEN_RE, BaseTemplate, Part, as_dicts
from .tools import expand


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
            tools = spec.get("tools", {})
            self.tool_format: str | None = tools.get("format")
            self.tool_system_prefix: str | None = tools.get("system_prefix")
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

    def _verbatim(self, message: dict[str, Any], gen: str, add) -> None:
        """A tool format's verbatim pieces (chat/tools.py); an assistant's (a call) is the model's to write."""
        mine = message["role"] == "assistant"
        if mine:
            add(gen)
        for text, literal in message["parts"]:
            add(text, trained=mine, literal=literal)
        if mine:
            add(self.assistant["suffix"], trained=True)
            add(self.assistant["separator"])

    def parts(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[Part]:
        out: list[Part] = []

        def add(text: str, trained: bool = False, literal: bool = False) -> None:
            if text:
                out.append((text, trained, literal))

        if self.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = expand(self.tool_format or "hermes", messages, self.tools, self.system["default"])

        # A system message the conversation gives is placed even when empty (as Meta's and the HF templates
        # do); without one the template's default is used, or with `always` an empty block.
        system = self.system["default"]
        if messages and messages[0]["role"] == "system":
            system, messages = self._content(messages[0]), messages[1:]
            if self.system["placement"] == "none":
                raise CamelidError(f"the {self.name} template has no place for a system message; leave it out")
        has_system = self.system["placement"] not in ("none", "drop") and (system is not None or self.system["always"])
        prefix = (self.tools and self.tool_system_prefix or self.system["prefix"]).replace(
            "{today}", time.strftime("%d %b %Y"))
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
        seen_user = False
        for i, m in enumerate(messages):
            if "parts" in m:
                self._verbatim(m, gen, add)
            elif m["role"] == "user":
                first, seen_user = not seen_user, True  # (a tool listing may come before the first one)
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
    marker = FLM_TOKEN_RE.sub("", user_role).strip()
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
