"""GGUF vocabularies as Hugging Face `tokenizers`: the one place that turns a GGUF file's tokenizer.* keys into a
tokenizer (for running a GGUF, and for the tokenizer.json a conversion from GGUF or a byte-level .flm
writes), and names a tokenizer.json's pre-tokenizer the GGUF way (for writing a GGUF).

SentencePiece-style ('llama') vocabularies become BPE with byte fallback, merges implied by the scores as
llama.cpp's SPM tokenizer merges; byte-level ('gpt2') ones BPE over GPT-2's byte alphabet with the
pre-tokenizer `tokenizer.ggml.pre` names. Imports nothing of camelid but errors.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

from .errors import CamelidError

# GGUF token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer splits for byte-level vocabularies, by `tokenizer.ggml.pre` (from llama.cpp's llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {name: _LLAMA3_SPLIT for name in ("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx")}
_SPLIT_PRE.update({name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen")})
# GPT-2's regex after every digit is split off alone (the HF tokenizers of these models use Digits(individual)).
_DIGIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r"}
_GPT2_PRE = {None, "default", "gpt2"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spm_merges(tokens: list[str], scores: list[float], mergeable: list[bool]) -> list[tuple[str, str]]:
    """Merges a SentencePiece BPE vocabulary implies: a token of higher score merges first, as in
    llama.cpp's SPM tokenizer (which merges the adjacent pair whose join has the best score)."""
    index = {t: i for i, t in enumerate(tokens) if mergeable[i]}
    found = []
    for token, i in index.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in index and right in index:
                found.append((-scores[i], index[left], index[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _gguf_llama(md: dict[str, Any]) -> tokenizers.Tokenizer:
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if "tokenizer.ggml.merges" in md:
        merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    else:
        merges = _spm_merges(tokens, scores, [t in (NORMAL, USER_DEFINED) for t in types])
    unk = md.get("tokenizer.ggml.unknown_token_id")
    model = tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges, byte_fallback=True, fuse_unk=True,
                                  unk_token=tokens[unk] if unk is not None else None)
    tok = tokenizers.Tokenizer(model)
    # llama.cpp prefixes a space to every run of text that starts the input or follows a special token,
    # which is what Prepend in the normalizer does (it runs on each piece between added tokens).
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_typed_tokens(tok, tokens, types, lambda t: True)
    return tok


def _gguf_gpt2(md: dict[str, Any]) -> tokenizers.Tokenizer:
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Normal tokens are stored in the byte alphabet already; a few files keep user tokens as raw text.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    pre = md.get("tokenizer.ggml.pre")
    # llama.cpp uses a whole word found in the vocabulary as is for Llama-3 style vocabularies.
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, ignore_merges=pre in _SPLIT_PRE))
    if pre in _SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2_PRE | _DIGIT_PRE:
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known to camelid; splitting words like GPT-2, "
                          "so some texts may tokenize differently from llama.cpp", stacklevel=3)
        level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level])
                             if pre in _DIGIT_PRE else level)
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet would get a new id past the vocabulary: leave it out.
    _add_typed_tokens(tok, tokens, types, lambda t: set(t) <= alphabet)
    return tok


def _add_typed_tokens(tok: tokenizers.Tokenizer, tokens: list[str], types: list[int], usable) -> None:
    """Control/unknown tokens become special added tokens and user-defined ones plain added tokens,
    so that neither is ever cut into pieces (llama.cpp matches both whole in the text)."""
    special = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k in (CONTROL, UNKNOWN) and usable(t)]
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == USER_DEFINED and usable(t)]
    tok.add_special_tokens(special)
    tok.add_tokens(user)


def build(md: dict[str, Any]) -> tuple[tokenizers.Tokenizer, bool]:
    """(tokenizer, whether it adds BOS) of GGUF metadata's tokenizer.* keys; CamelidError when there is
    none, of a kind camelid does not read, or damaged."""
    kind = md.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in md:
        raise CamelidError("this GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer; "
                           "pass the model's tokenizer folder instead")
    if kind == "llama":
        tok, add_bos = _gguf_llama(md), md.get("tokenizer.ggml.add_bos_token", True)
    elif kind == "gpt2":
        tok, add_bos = _gguf_gpt2(md), md.get("tokenizer.ggml.add_bos_token", False)
    else:
        raise CamelidError(f"GGUF tokenizer model {kind!r} is not supported (camelid reads 'llama' and 'gpt2' "
                           "vocabularies); use the model's tokenizer.json instead")
    built, stored = tok.get_vocab_size(with_added_tokens=True), len(md["tokenizer.ggml.tokens"])
    if built != stored:
        raise CamelidError(f"GGUF vocabulary of {stored} tokens has duplicate or unusable entries (built {built}); "
                           "the file's tokenizer is damaged")
    bos = md.get("tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None and tok.id_to_token(bos) is not None:
        # transformers' fast tokenizer adds BOS only through tokenizer.json's post-processor (as its own Llama
        # conversions write it); add_bos_token in tokenizer_config.json alone is ignored. camelid encodes
        # without it and adds BOS itself.
        mark = tok.id_to_token(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{mark}:0 $A:0", pair=f"{mark}:0 $A:0 {mark}:1 $B:1",
                                                           special_tokens=[(mark, bos)])
    return tok, bool(add_bos)


def special_ids(md: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(BOS, EOS, padding) token ids the metadata names."""
    bos, eos, pad = (md.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding"))
    return bos, eos, pad


def hf_tokenizer_config(specials: dict[str, str], *, add_bos: bool, chat_template: str | None,
                        sentencepiece: bool = False) -> dict[str, Any]:
    """tokenizer_config.json as transformers writes it (AutoTokenizer loads the folder); `sentencepiece`: the
    vocabulary is a tokenizer.model (transformers' LlamaTokenizer reads it)."""
    config: dict[str, Any] = {"tokenizer_class": "LlamaTokenizer" if sentencepiece else "PreTrainedTokenizerFast",
                              **({"legacy": True} if sentencepiece else {}), **specials,
                              "add_bos_token": bool(add_bos), "add_eos_token": False,
                              "clean_up_tokenization_spaces": False, "model_max_length": 10**30}
    if chat_template:
        config["chat_template"] = chat_template
    return config


def write_hf_files(md: dict[str, Any], folder: Path, *, chat_template: str | None = None) -> dict[str, Path]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of GGUF-style metadata in `folder`
    (the chat template: `chat_template`, else the metadata's)."""
    tok, add_bos = build(md)
    bos, eos, pad = special_ids(md)
    # Written by Python, not tokenizers' save: a full disk is then an OSError (one line), not a bare Exception.
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    specials = {key: tok.id_to_token(i) for key, i in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad))
                if i is not None and tok.id_to_token(i) is not None}
    special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    if "<unk>" in special:
        specials["unk_token"] = "<unk>"
    config = hf_tokenizer_config(specials, add_bos=add_bos,
                                 chat_template=chat_template or md.get("tokenizer.chat_template"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    return {f: folder / f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}


def gguf_pre(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level tokenizer.json pre-tokenizer: the inverse of the
    table `build` reads GGUF vocabularies with (llama.cpp itself runs every name of one group the same)."""
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" \
        else [pre_tokenizer or {}]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm" if "smollm" in _DIGIT_PRE else sorted(_DIGIT_PRE)[0]
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if regex == _SPLIT_PRE[name]:
                return name
    return "gpt2" if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) else "default"
