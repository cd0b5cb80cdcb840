"""`camelid templates` (the built-in conversation templates) and `camelid prompt` (what a template makes of
a conversation)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CamelidError


def cmd_templates(args: argparse.Namespace) -> None:
    """List the built-in conversation templates with one-line descriptions."""
    from ..chat import list_templates
    rows = list_templates()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")


def _load_tokenizer(path: str):
    from ..tokenizer import Tokenizer  # loaded for --ids only
    p = Path(path)
    if p.is_dir():
        return Tokenizer.from_folder(p)
    if p.suffix == ".gguf":
        from ..formats.gguf import tokenizer_of
        return tokenizer_of(p)
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
    from ..chat import get_template
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("templates", help=cmd_templates.__doc__, description=cmd_templates.__doc__)
    p.set_defaults(func=cmd_templates)
    p = sub.add_parser("prompt", help=cmd_prompt.__doc__, description=cmd_prompt.__doc__)
    add_prompt_arguments(p)
    p.set_defaults(func=cmd_prompt)
