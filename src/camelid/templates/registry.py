"""The named templates, the choice of a model's template, and the `camelid templates` / `camelid prompt`
commands."""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..chat import BaseTemplate, Template, template_from_fastllm, template_from_hf, template_from_lmserver
from ..errors import CamelidError
from . import builtin_specs, fastllm_configs

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
                     model_name: str | None, tokenizer: Any) -> tuple[BaseTemplate, str | None]:
    """The template a model gets, and a notice to print when it was guessed from the model's name.

    Order: an explicit name; the model folder's camelid.json; the model's own HF/GGUF chat template;
    a match on the model's name. Nothing matching is an error, never a silent fallback."""
    def embedded_template() -> BaseTemplate:
        return template_from_hf(embedded, bos_token=getattr(tokenizer, "bos_token", None),
                                eos_token=getattr(tokenizer, "eos_token", None), name="embedded")

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


# ---- commands -------------------------------------------------------------------------------------------
def cmd_templates(args: argparse.Namespace) -> None:
    """List the built-in conversation templates with one-line descriptions."""
    rows = list_templates()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")


def _load_tokenizer(path: str):
    from ..tokenizer import Tokenizer
    p = Path(path)
    if p.is_dir():
        return Tokenizer.from_folder(p)
    return Tokenizer.from_file(p)


def cmd_prompt(args: argparse.Namespace) -> None:
    """Print the prompt a template makes of a JSON list of {"role", "content"} messages (or, with --ids,
    its token ids and loss mask as JSON)."""
    try:
        text = sys.stdin.read() if args.messages == "-" else Path(args.messages).read_text(encoding="utf-8")
        messages = json.loads(text)
    except (OSError, ValueError) as e:
        raise CamelidError(f"--messages {args.messages}: cannot read a JSON list of messages ({e})") from None
    if not isinstance(messages, list):
        raise CamelidError(f"--messages {args.messages}: expected a JSON list of {{\"role\", \"content\"}} objects")
    template = get_template(args.template)
    generation = not args.no_generation_prompt
    if not args.ids:
        sys.stdout.write(template.render_text(messages, add_generation_prompt=generation))
        sys.stdout.write("\n")
        return
    if not args.tokenizer:
        raise CamelidError("--ids needs --tokenizer PATH (a tokenizer folder, tokenizer.json/.model or .gguf file)")
    tokenizer = _load_tokenizer(args.tokenizer)
    ids, mask = template.render_ids(messages, tokenizer, add_generation_prompt=generation)
    print(json.dumps({"template": template.name, "ids": ids, "mask": [int(m) for m in mask],
                      "text": tokenizer.decode(ids)}, ensure_ascii=False))


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", required=True, help="template name (camelid templates lists them)")
    p.add_argument("--messages", required=True, metavar="FILE.json",
                   help='a JSON list of {"role": "system"|"user"|"assistant", "content": "..."}; - reads standard input')
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or file (.json, .model, .gguf), for --ids")
    p.add_argument("--ids", action="store_true", help="print token ids and loss mask as JSON")
    p.add_argument("--no-generation-prompt", action="store_true",
                   help="render a finished conversation, without the assistant's opening")
