"""Constrained decoding: JSON schemas compiled by llguidance (the grammar engine llama.cpp, vLLM and SGLang
use) into a matcher that, before each token, fills a packed vocabulary bitmask of the tokens that keep the
output valid, and consumes the token chosen.

A matcher belongs to one request; the tokenizer description it needs (every token's bytes) is built once per
model (~0.4 s for a 49k vocabulary) and shared. Nothing here knows about HTTP or the batch: the scheduler
asks a row's `Constraint` for its mask and hands it to `sampling.choose`.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import torch

from .errors import CamelidError

# JSON as json.dumps writes it (", " and ": ", no other whitespace): the spacing models saw most, and a sampled
# model cannot wander into endless blank space, which flexible whitespace allows at temperature 1.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise CamelidError("structured output needs llguidance: pip install llguidance") from None
    return llguidance


class _TokenTable:
    """llguidance's view of a tokenizer that is not a `tokenizers` JSON (SentencePiece): each token's bytes."""

    def __init__(self, tokenizer: Any, stop_ids: list[int]):
        self._tok = tokenizer
        self.eos_token_id = stop_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [self._bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]

    def _bytes(self, i: int) -> bytes:
        piece = self._tok.id_to_token(i)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def __call__(self, text: str | bytes) -> list[int]:
        return self._tok.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


class GrammarCompiler:
    """Builds matchers for one model's tokenizer; thread-safe, the tokenizer table built on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_ids = sorted(stop_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        self._lock = threading.Lock()
        self._ll_tokenizer = None

    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                llg = _llguidance()
                source = self.tokenizer.tokenizer_json() or llg.TokenizerWrapper(_TokenTable(self.tokenizer,
                                                                                             self.stop_ids))
                self._ll_tokenizer = llg.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=self.stop_ids)
            return self._ll_tokenizer

    def json_schema(self, schema: dict | None, lead: str = "") -> "Constraint":
        """A constraint to one JSON value of `schema` (None: any JSON object, OpenAI's json_object mode),
        after the fixed text `lead` (a tool format's space before its call, so the model may write it as
        part of its first token, as it was trained)."""
        llg = _llguidance()
        schema = schema if schema is not None else {"type": "object"}
        try:
            if lead:
                value = json.dumps({**schema, "x-guidance": _JSON_OPTIONS})
                grammar = llg.LLMatcher.grammar_from_lark(f"start: {json.dumps(lead)} value\nvalue: %json {value}")
            else:
                grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise CamelidError(f"the JSON schema is not usable: {e}") from None
        return self._matcher(grammar)

    def _matcher(self, grammar: str) -> "Constraint":
        llg = _llguidance()
        tokenizer = self.ll_tokenizer()
        error = llg.LLMatcher.validate_grammar(grammar, tokenizer)
        if error and not error.startswith("WARNING"):
            raise CamelidError(f"the JSON schema cannot be enforced: {error}")
        matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise CamelidError(f"the JSON schema cannot be enforced: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's grammar state: `mask()` before a token, `accept(token)` after it."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.words = (vocab_size + 31) // 32
        self._mask = torch.empty(self.words, dtype=torch.int32)

    def mask(self) -> torch.Tensor:
        """The packed int32 bitmask of allowed tokens (a buffer reused between steps)."""
        self.matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self.words * 4)
        return self._mask

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the value is closed)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def schema_of(response_format: dict) -> dict | None:
    """The JSON schema an OpenAI `response_format` asks for (None: any object); raises on a bad format."""
    kind = response_format.get("type")
    if kind == "json_object":
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if schema is None:
            return {}  # OpenAI allows leaving it out: any JSON value
        if not isinstance(schema, dict):
            raise CamelidError("response_format.json_schema.schema must be a JSON object")
        json.dumps(schema)  # must be plain JSON
        return schema
    raise CamelidError(f"response_format.type {kind!r} is not supported (text, json_object, json_schema)")
