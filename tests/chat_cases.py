"""Conversations and tokenizers the chat-template tests share (a helper module, not a test module): the real
LLaMA-2 tokenizer with a model family's special tokens added."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import tokenizers

from camelid.tokenizer import Tokenizer

from .helpers import LLAMA2_TOKENIZER_DIR


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


S, U, A = "system", "user", "assistant"
CONVERSATIONS = {
    "one-turn": msgs((U, "Hello!")),
    "system-two-turns": msgs((S, "You are terse."), (U, "Hi"), (A, "Hello."), (U, "How are you?")),
    "unicode-finished": msgs((U, "héllo 世界 🦙"), (A, "¡Hola! 你好"), (U, "more"), (A, "ok.")),
    "spaces": msgs((U, "  spaced  "), (A, " reply "), (U, "x")),
    "four-turns-system": msgs((S, "Answer in French."), (U, "one"), (A, "un"), (U, "two"), (A, "deux"),
                              (U, "three"), (A, "trois"), (U, "four")),
    "empty-contents": msgs((U, ""), (A, ""), (U, "after empty")),
    "empty-system": msgs((S, ""), (U, "Hi")),
    "spaced-system": msgs((S, "  Be brief.  "), (U, " q "), (A, " a "), (U, "b")),
}


def special_tokenizer(llama2: Tokenizer, template) -> Tokenizer:
    """The LLaMA-2 tokenizer with the template's own special tokens added (as its model's tokenizer has)."""
    needed = [t for t in (template.bos, template.eos, *template.stop_tokens) if t and llama2.token_to_id(t) is None]
    needed += [t for t in ("<|im_start|>", "<|start_header_id|>", "<|end_header_id|>", "<reserved_106>",
                           "<reserved_107>") if t in str(template.user) + str(template.assistant)]
    return llama2_with_tokens(tuple(dict.fromkeys(needed)))


_FOLDERS: dict[tuple, Tokenizer] = {}


def llama2_folder(tokens: tuple[str, ...], config: dict | None = None, *, legacy: bool = True) -> Path:
    """A tokenizer folder: the real LLaMA-2 tokenizer.json with `tokens` added as special tokens, and a
    tokenizer_config.json (`config`) beside it. legacy=False: the word-start mark is put only at the very
    start of the text, not again after each special token (transformers' `legacy=False` Llama/Mistral
    tokenizers, for which Mistral's current template writes ' [INST]')."""
    folder = Path(tempfile.mkdtemp(prefix="camelid-tok-"))
    data = json.loads((LLAMA2_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    if not legacy:
        data["normalizer"] = None
        data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in tokens])
    tok.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", **(config or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, ensure_ascii=False), encoding="utf-8")
    return folder


def llama2_with_tokens(tokens: tuple[str, ...]) -> Tokenizer:
    if tokens not in _FOLDERS:
        _FOLDERS[tokens] = Tokenizer.from_folder(llama2_folder(tokens))
    return _FOLDERS[tokens]
