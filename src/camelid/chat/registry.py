"""The named templates (templates/*.json, the fastllm cookbook), name matching, and the choice of a
model's template."""
from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import CamelidError
from ..templates import builtin_specs, fastllm_configs
from .jinja import template_from_hf
from .render import BaseTemplate
from .spec import Template, template_from_fastllm, template_from_lmserver

FASTLLM_PREFIX = "fastllm-"


@lru_cache(maxsize=None)
def _registry() -> tuple[dict[str, Template], dict[str, str]]:
    """Templates by name, and every alias (lower case) -> name."""
    templates: dict[str, Template] = {}
    for spec in builtin_specs():
        t = Template(spec)
        templates[t.name] = t
    for family, cfg in fastllm_configs().items():
        name = FASTLLM_PREFIX + family
        templates[name] = template_from_fastllm(cfg["pre_prompt"], cfg["user_role"], cfg["bot_role"],
                                                cfg["history_sep"], name=name,
                                                description=f"fastllm cookbook prompt: {cfg['description']}")
    aliases = {name.lower(): name for name in templates}
    for t in templates.values():
        for alias in getattr(t, "aliases", []):
            aliases.setdefault(alias.lower(), t.name)
    return templates, aliases


def get_template(name: str) -> Template:
    """A built-in template by name or alias (case does not matter)."""
    templates, aliases = _registry()
    key = name.strip().lower()
    if key in aliases:
        return templates[aliases[key]]
    close = difflib.get_close_matches(key, list(aliases), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(dict.fromkeys(aliases[c] for c in close))}?" if close else ""
    raise CamelidError(f"no conversation template named {name!r}{hint} (`camelid templates` lists them)")


def list_templates() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in template."""
    return [(t.name, t.description) for t in _registry()[0].values()]


def match_model_name(model_name: str) -> tuple[Template, str] | None:
    """The template whose longest name pattern occurs in the model's name (the most specific wins:
    'codellama' before 'llama', 'vicuna-7b-delta-v0' before 'vicuna'). A template whose `match_not`
    matches the name is out: a newer version of a family ('Llama-3.4', 'Mistral-...-v0.4') gets no template
    rather than an older one's format."""
    lowered = model_name.lower()
    best: tuple[int, Template, str] | None = None
    for t in _registry()[0].values():
        if any(re.search(rx, lowered) for rx in getattr(t, "match_not", [])):
            continue
        for pattern in getattr(t, "match", []):
            if pattern in lowered and (best is None or len(pattern) > best[0]):
                best = (len(pattern), t, pattern)
    return (best[1], best[2]) if best else None


def _from_camelid_json(value: Any, source: Path) -> Template | None:
    """camelid.json's chat_template: a template name, "embedded" (None here: the embedded one follows),
    or a dict of fastllm settings / EasyLM LMServer chat flags."""
    if value is None or value == "embedded":
        return None
    if isinstance(value, str):
        try:
            return get_template(value)
        except CamelidError as e:
            raise CamelidError(f"{source}: chat_template: {e}") from None
    if isinstance(value, dict):
        fastllm = ("pre_prompt", "user_role", "bot_role", "history_sep")
        lmserver = ("chat_prepend_text", "chat_user_prefix", "chat_user_suffix", "chat_lm_prefix", "chat_lm_suffix")
        for keys, build in ((fastllm, template_from_fastllm), (lmserver, template_from_lmserver)):
            if any(k in value for k in keys):
                missing = [k for k in keys if not isinstance(value.get(k), str)]
                if missing:
                    raise CamelidError(f"{source}: chat_template lacks {', '.join(missing)} (all of "
                                       f"{', '.join(keys)} are needed)")
                return build(*(value[k] for k in keys))
    raise CamelidError(f"{source}: chat_template must be a template name, \"embedded\", or fastllm "
                       "(pre_prompt, user_role, bot_role, history_sep) or LMServer (chat_*) settings")


def resolve_template(*, explicit: str | None, model_dir: Path | None, embedded: str | None,
                     model_name: str | None, tokenizer: Any = None, bos_token: str | None = None,
                     eos_token: str | None = None) -> tuple[BaseTemplate, str | None]:
    """The template a model gets, and a notice to print when it was guessed from the model's name.

    Order: an explicit name; the model folder's camelid.json; the model's own HF/GGUF chat template;
    a match on the model's name. Nothing matching is an error, never a silent fallback. The embedded
    template's BOS/EOS text: bos_token/eos_token, else the tokenizer's."""
    def embedded_template() -> BaseTemplate:
        return template_from_hf(embedded, bos_token=bos_token or getattr(tokenizer, "bos_token", None),
                                eos_token=eos_token or getattr(tokenizer, "eos_token", None), name="embedded")

    if explicit:
        if explicit.lower() in ("embedded", "hf"):
            if not embedded:
                raise CamelidError(f"--template {explicit}: {model_name or model_dir} carries no chat template")
            return embedded_template(), None
        return get_template(explicit), None
    if model_dir is not None:
        from ..formats import manifest  # the one reader of camelid.json (imports only errors)
        chosen = _from_camelid_json(manifest.field(model_dir, "chat_template"), manifest.path_of(model_dir))
        if chosen is not None:
            return chosen, None
    if embedded:
        return embedded_template(), None
    if model_name:
        found = match_model_name(model_name)
        if found:
            template, pattern = found
            return template, (f"using the {template.name} template because the model's name contains {pattern!r}; "
                              "pass --template NAME to choose another (camelid templates lists them)")
    raise CamelidError(f"{model_name or model_dir or 'the model'} carries no chat template and its name matches none "
                       "of camelid's; pass --template NAME (camelid templates lists them)")


def template_for(model_path: str | Path | None, embedded: str | None = None, name_hint: str | None = None,
                 override: str | None = None, *, tokenizer: Any = None, bos_token: str | None = None,
                 eos_token: str | None = None) -> tuple[BaseTemplate, str | None]:
    """Which template a model gets: the one answer for chat, generate, serve, train, eval and convert.

    model_path: the model's file or folder (a folder's camelid.json may name its template); embedded: the
    jinja template it carries (tokenizer_config.json, GGUF or .flm metadata); name_hint: the model's name,
    matched against the built-ins when nothing else decides; override: the user's --template. Returns the
    template and a notice to print when it was guessed from the name; nothing matching is an error."""
    path = Path(model_path).expanduser() if model_path is not None else None
    return resolve_template(explicit=override, model_dir=path if path is not None and path.is_dir() else None,
                            embedded=embedded, model_name=name_hint, tokenizer=tokenizer, bos_token=bos_token,
                            eos_token=eos_token)


def check_template_name(name: str | None, option: str = "--template") -> None:
    """Refuse a template name that names no built-in, before any model loads ("embedded" and "hf", the
    model's own template, can be checked only once the model is open)."""
    if name and name.lower() not in ("embedded", "hf"):
        try:
            get_template(name)
        except CamelidError as e:
            raise CamelidError(f"{option}: {e}") from None
