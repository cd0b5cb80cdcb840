"""One tokenizer wrapper over `tokenizers` (tokenizer.json), `sentencepiece` (tokenizer.model) and GGUF
vocabularies, with a streaming decoder that never emits half a character.

`encode` never adds BOS/EOS on its own: the caller (chat templates, training data) decides, so a
template that already writes `<s>` does not get two.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import sentencepiece
import tokenizers
from tokenizers import AddedToken

from .errors import CamelidError
from . import gguf_vocab

# Tokens llama.cpp treats as end of generation when they exist in the vocabulary (its "EOG" set).
EOG_TOKENS = ("</s>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
              "<end_of_turn>", "<|EOT|>", "<EOT>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>")

LONG_TEXT = 16384  # characters: a text longer than this is encoded with the GIL released


class _HFBackend:
    """A `tokenizers.Tokenizer`, with its post-processor (the one that adds `<s>`) never used."""

    def __init__(self, tok: tokenizers.Tokenizer):
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        self._refresh()

    def _refresh(self) -> None:
        self._literal: tokenizers.Tokenizer | None = None  # a twin that reads special-token strings as text
        self.special_ids = {i for i, a in self.tok.get_added_tokens_decoder().items() if a.special}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, added: dict[str, bool]) -> None:
        self.tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, s in added.items() if s])
        self.tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, s in added.items() if not s])
        self._refresh()

    def encode(self, text: str, special: bool) -> list[int]:
        tok = self.tok
        if not special:
            if self._literal is None:
                self._literal = tokenizers.Tokenizer.from_str(self.tok.to_str())
                self._literal.encode_special_tokens = True
            tok = self._literal
        if len(text) > LONG_TEXT:
            # `encode` holds the GIL throughout (a second per MB): the batch call releases it, so the
            # server's event loop goes on answering while a worker thread tokenizes a long prompt.
            return tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], special: bool) -> list[list[int]]:
        if not special:
            self.encode("", False)  # builds the literal twin
        tok = self.tok if special else self._literal
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]  # no offsets: faster

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)


class _SPBackend:
    """A SentencePiece model plus the added tokens of tokenizer_config.json, split off before encoding
    (each text run between them gets SentencePiece's own dummy-prefix space, as in LLaMA's legacy mode)."""

    def __init__(self, path: Path):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise CamelidError(f"{path}: not a readable SentencePiece model ({e}); replace the file") from None
        n = self.sp.get_piece_size()
        self.pieces = [self.sp.id_to_piece(i) for i in range(n)]
        self.added: dict[str, int] = {}
        self._added_ids: set[int] = set()
        self.special_ids = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.vocab_size = n
        # The processor does not expose add_dummy_prefix: see whether a lone letter gets the ▁ prefix.
        first = self.sp.encode("a", out_type=str)
        self.dummy_prefix = bool(first) and first[0].startswith("▁")
        self._split_cache: dict[bool, re.Pattern | None] = {}

    def add_tokens(self, added: dict[str, bool]) -> None:
        for token, special in added.items():
            i = self.token_to_id(token)
            if i is None:
                i = self.vocab_size
                self.added[token] = i
                self.vocab_size += 1
            elif i >= len(self.pieces) or not self.sp.is_control(i):
                self.added[token] = i  # matched whole in the text, like HF's added tokens
            if special:
                self.special_ids.add(i)
        self._added_ids = set(self.added.values())
        self._split_cache.clear()

    def _splitter(self, special: bool) -> re.Pattern | None:
        if special not in self._split_cache:
            whole = {t for t, i in self.added.items() if special or i not in self.special_ids}
            if special:
                whole |= {self.pieces[i] for i in self.special_ids if i < len(self.pieces)}
            alternatives = "|".join(re.escape(t) for t in sorted(whole, key=len, reverse=True))
            self._split_cache[special] = re.compile(f"({alternatives})") if alternatives else None
        return self._split_cache[special]

    def encode(self, text: str, special: bool) -> list[int]:
        splitter = self._splitter(special)
        parts = splitter.split(text) if splitter else [text]
        ids: list[int] = []
        for n, part in enumerate(parts):
            if n % 2:
                ids.append(self.token_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        out = bytearray()
        for i in ids:
            if skip_special and i in self.special_ids:
                continue
            if i >= len(self.pieces) or i in self._added_ids:
                out += self.id_to_token(i).encode()
            elif self.sp.is_byte(i):
                out.append(int(self.pieces[i][3:5], 16))
            elif self.sp.is_unknown(i):
                out += " \u2047 ".encode()  # what SentencePiece itself writes for an unknown piece
            else:
                out += self.pieces[i].replace("▁", " ").encode()
        text = out.decode("utf-8", errors="replace")
        return text[1:] if self.dummy_prefix and text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.pieces[i] else i

    def id_to_token(self, i: int) -> str | None:
        if 0 <= i < len(self.pieces):
            return self.pieces[i]
        return next((t for t, j in self.added.items() if j == i), None)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CamelidError(f"{path}: not valid JSON ({e}); fix or replace the file") from None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens, BOS policy and chat template."""

    def __init__(self, backend: _HFBackend | _SPBackend, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, chat_template: str | None = None,
                 extra_stop_ids: Sequence[int] = ()):
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.bos_token = self.id_to_token(bos_id) if bos_id is not None else None
        self.eos_token = self.id_to_token(eos_id) if eos_id is not None else None
        self.add_bos = add_bos
        self.chat_template = chat_template
        eog = {self.token_to_id(t) for t in EOG_TOKENS}
        self.stop_ids: set[int] = {i for i in eog if i is not None and self.is_special(i)}
        self.stop_ids |= {i for i in (eos_id, *extra_stop_ids) if i is not None}

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer.json or a SentencePiece tokenizer.model on its own (no config files). A .gguf file's
        vocabulary: formats.gguf.tokenizer_of."""
        path = Path(path)
        if not path.is_file():
            raise CamelidError(f"{path}: no such tokenizer file")
        if path.suffix == ".gguf":
            raise CamelidError(f"{path}: a GGUF file's vocabulary is read with formats.gguf.tokenizer_of")
        backend = cls._open_backend(path)
        if isinstance(backend, _SPBackend):
            sp = backend.sp
            ids = [i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id())]
            return cls(backend, bos_id=ids[0], eos_id=ids[1], pad_id=ids[2], add_bos=True)
        bos = _post_processor_bos(backend.tok)
        return cls(backend, bos_id=bos, add_bos=bos is not None)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """The tokenizer of an HF model folder: tokenizer.json (else tokenizer.model) plus the settings in
        tokenizer_config.json, special_tokens_map.json and generation_config.json."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CamelidError(f"{folder}: no such folder")
        files = [folder / name for name in ("tokenizer.json", "tokenizer.model") if (folder / name).is_file()]
        if not files:
            raise CamelidError(f"{folder}: no tokenizer.json or tokenizer.model in this folder; "
                               "copy the tokenizer files of the model here")
        backend = cls._open_backend(files[0])
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        tokens_map = (_read_json(folder / "special_tokens_map.json")
                      if (folder / "special_tokens_map.json").is_file() else {})
        generation = (_read_json(folder / "generation_config.json")
                      if (folder / "generation_config.json").is_file() else {})

        added = {a["content"]: bool(a.get("special", False))
                 for a in (config.get("added_tokens_decoder") or {}).values() if isinstance(a, dict) and "content" in a}
        if (folder / "added_tokens.json").is_file():  # older slow tokenizers: {"[PAD]": 32000}
            added.update({t: False for t in _read_json(folder / "added_tokens.json")})
        if added:
            backend.add_tokens(added)

        def token_id(name: str) -> int | None:
            text = _token_text(config.get(name)) or _token_text(tokens_map.get(name))
            return backend.token_to_id(text) if text is not None else None

        sp_ids = (backend.sp.bos_id(), backend.sp.eos_id()) if isinstance(backend, _SPBackend) else (-1, -1)
        bos = token_id("bos_token")
        bos = bos if bos is not None else (sp_ids[0] if sp_ids[0] >= 0 else None)
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos = token_id("eos_token")
        eos = eos if eos is not None else (gen_eos[0] if gen_eos else (sp_ids[1] if sp_ids[1] >= 0 else None))
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # no flag: a SentencePiece model (LLaMA) adds BOS, a tokenizer.json says so in its post-processor
            add_bos = isinstance(backend, _SPBackend) or _post_processor_bos(backend.tok) is not None
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (folder / "chat_template.jinja").is_file():  # newer transformers save it as its own file
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, bos_id=bos, eos_id=eos, pad_id=token_id("pad_token"), add_bos=add_bos,
                   chat_template=template, extra_stop_ids=gen_eos)

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> "Tokenizer":
        """The tokenizer a GGUF file describes (`GGUFReader(path).metadata`): SentencePiece-style ('llama')
        or byte-level BPE ('gpt2') vocabularies (built by gguf_vocab.py)."""
        tok, add_bos = gguf_vocab.build(metadata)
        bos, eos, pad = gguf_vocab.special_ids(metadata)
        return cls(_HFBackend(tok), bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos,
                   chat_template=metadata.get("tokenizer.chat_template"))

    @staticmethod
    def _open_backend(path: Path) -> _HFBackend | _SPBackend:
        if path.suffix == ".model":
            return _SPBackend(path)
        try:
            return _HFBackend(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CamelidError(f"{path}: not a readable tokenizer.json ({e}); fix or replace the file") from None

    # ---- use -----------------------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False, eos: bool = False, special: bool = True) -> list[int]:
        """Token ids of `text`. BOS/EOS only when asked for. With special=False, special-token strings
        in the text ('<|im_start|>') are read as plain text, as user input should be."""
        ids = self._backend.encode(text, special)
        if bos:
            if self.bos_id is None:
                raise CamelidError("this tokenizer has no BOS token; encode without bos=True")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise CamelidError("this tokenizer has no EOS token; encode without eos=True")
            ids.append(self.eos_id)
        return ids

    def encode_prompt(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of a prompt given as plain text: BOS first when this tokenizer adds one (its
        add_bos_token, as transformers' `tokenizer(text)` does), no EOS."""
        return self.encode(text, bos=self.add_bos and self.bos_id is not None, special=special)

    def encode_batch(self, texts: list[str], *, special: bool = True) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS), as `encode` gives them; a tokenizer.json encodes the batch on
        all cores in its own threads."""
        batch = getattr(self._backend, "encode_batch", None)
        if batch is not None:
            return batch(texts, special)
        return [self._backend.encode(t, special) for t in texts]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self._backend.decode(ids, skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        token = self._backend.id_to_token(i)
        if token is None:
            raise CamelidError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        return token

    def is_special(self, i: int) -> bool:
        return i in self._backend.special_ids

    def tokenizer_json(self, *, pretty: bool = False) -> str | None:
        """This vocabulary as tokenizer.json text (added tokens included); None for a SentencePiece one."""
        backend = self._backend
        return backend.tok.to_str(pretty=pretty) if isinstance(backend, _HFBackend) else None

    def sentencepiece_model(self) -> bytes | None:
        """A SentencePiece vocabulary as tokenizer.model bytes; None for a tokenizer.json one."""
        backend = self._backend
        return backend.sp.serialized_model_proto() if isinstance(backend, _SPBackend) else None

    def fingerprint(self) -> str:
        """sha256 of everything that decides the ids: the vocabulary and rules, added tokens, BOS/EOS."""
        import hashlib
        backend = self._backend
        h = hashlib.sha256()
        if isinstance(backend, _HFBackend):
            h.update(backend.tok.to_str().encode())
        else:
            h.update(backend.sp.serialized_model_proto())
            h.update(json.dumps(sorted(backend.added.items())).encode())
        h.update(json.dumps([self.bos_id, self.eos_id, self.add_bos, self.vocab_size]).encode())
        return h.hexdigest()

    def stream(self, *, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)


def _post_processor_bos(tok: tokenizers.Tokenizer) -> int | None:
    """The id a tokenizer.json's TemplateProcessing puts in front of a single sequence, if any."""
    post = json.loads(tok.to_str()).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            if "SpecialToken" in first:
                ids = step.get("special_tokens", {}).get(first["SpecialToken"]["id"], {}).get("ids")
                return ids[0] if ids else None
    return None


class StreamDecoder:
    """Turns generated ids into text as they arrive. Joined, its chunks plus `flush()` equal
    `decode(ids)`; a chunk never ends inside a UTF-8 character, and a word's leading space comes with it.

    It decodes (context + pending) and emits the difference against what is already out, where the
    context is only the last settled token (or character): O(1) per token, however long the output (FastChat re-decodes
    everything). One token of context is enough to keep a SentencePiece '▁word' from losing its space;
    the tokenizer's own rule for the very first token still applies, because the stream starts empty.
    """

    MAX_PENDING = 8  # a longer run that still ends mid-character is not valid UTF-8: emit it as is
    _CONTINUATION_BYTE = re.compile(r"<0x[89AB][0-9A-F]>")  # a byte-fallback piece for UTF-8 bytes 0x80-0xBF

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._ids: list[int] = []   # context tokens (0 to 4) followed by pending tokens
        self._held = 0              # how many of self._ids are context
        self._sent = 0              # characters of decode(self._ids) already emitted

    def push(self, token_id: int) -> str:
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""  # decode(skip_special=True) ignores it; dropping it keeps the context a real token
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids, skip_special=self.skip_special)
        if text.endswith("\ufffd") and len(self._ids) - self._held <= self.MAX_PENDING:
            stable = text.rstrip("\ufffd")
            out = stable[self._sent:] if len(stable) > self._sent else ""
            self._sent = max(self._sent, len(stable))
            return out
        out = text[self._sent:]
        self._settle()
        return out

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end)."""
        out = self.tokenizer.decode(self._ids, skip_special=self.skip_special)[self._sent:]
        self._settle()
        return out

    def _settle(self) -> None:
        """The last token becomes the context for what follows. When it is a byte-fallback piece that ends
        a character ('<0x99>' of the 4 bytes of 🦙), the context is the whole character: ByteFallback decodes
        a run of byte pieces that starts with a stray continuation byte as one U+FFFD per piece, which
        would swallow the next byte-fallback character too."""
        keep = 1
        while keep < min(len(self._ids), 4) and self._is_continuation_byte(self._ids[-keep]):
            keep += 1
        self._ids = self._ids[-keep:]
        self._held = len(self._ids)
        self._sent = len(self.tokenizer.decode(self._ids, skip_special=self.skip_special))

    def _is_continuation_byte(self, token_id: int) -> bool:
        return self._CONTINUATION_BYTE.fullmatch(self.tokenizer.id_to_token(token_id)) is not None
