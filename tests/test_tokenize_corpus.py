"""`camelid data tokenize`: raw text -> tokens.bin + index.bin + manifest.json, checked against the
tokenizers transformers loads for the same model (the built-in GGUF's, LLaMA-2's SentencePiece-style one)."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from camelid.data.tokenize import tokenize_corpus
from camelid.errors import CamelidError
from tests.helpers import one_line_error

WORDS = ["llama", "alpaca", " vicuña", "Koala", "naïve", "日本語", "🦙", "<|im_end|>", "</s>", "  two  spaces",
         "tab\there", "line\nbreak", "x" * 40, "ünïcödé", "42", "3.14159", "```code```", "\u200b"]


def _doc(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))


def write_corpus(folder: Path, docs: int = 120, seed: int = 0) -> dict[str, list[str]]:
    """A JSONL, a gzip'd JSONL, a zstd JSONL and a plain text file; returns each file's documents."""
    import zstandard
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {}
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        texts = [_doc(rng) for _ in range(docs)]
        data = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=i % 2 == 0) + "\n" for i, t in enumerate(texts))
        raw = data.encode()
        if name.endswith(".gz"):
            raw = gzip.compress(raw, mtime=0)
        elif name.endswith(".zst"):
            raw = zstandard.ZstdCompressor().compress(raw)
        (folder / name).write_bytes(raw)
        out[name] = texts
    paragraphs = [_doc(rng).replace("\n", " ") for _ in range(docs // 4)]
    (folder / "d.txt").write_text("\n\n".join(paragraphs) + "\n")
    out["d.txt"] = paragraphs
    return out


def read_output(out: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = np.memmap(out / "tokens.bin", dtype=manifest["dtype"], mode="r")
    index = np.fromfile(out / "index.bin", dtype="<u8")
    return manifest, tokens, index


def documents(tokens: np.ndarray, index: np.ndarray) -> list[list[int]]:
    ends = list(index[1:]) + [len(tokens)]
    return [tokens[s:e].tolist() for s, e in zip(index, ends)]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_ids_equal_transformers_on_every_document(tmp_path, hf_smollm2):
    texts = write_corpus(tmp_path / "corpus")
    m = tokenize_corpus([str(tmp_path / "corpus")], tmp_path / "out", cache_dir=str(tmp_path / "cache"),
                        quiet=True)
    manifest, tokens, index = read_output(tmp_path / "out")
    assert manifest == m and manifest["dtype"] == "uint16" and tokens.dtype == np.uint16
    expected = [t for name in sorted(texts) for t in texts[name]]
    docs = documents(tokens, index)
    assert len(docs) == len(expected) == manifest["documents"] and manifest["tokens"] == len(tokens)
    eos = hf_smollm2.eos_token_id
    for doc, text in zip(docs, expected):
        # Raw text: special-token strings are text, as transformers' split_special_tokens reads them.
        ref = hf_smollm2(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert doc == ref + [eos], text
    assert [s["documents"] for s in manifest["sources"]] == [len(texts[n]) for n in sorted(texts)]
    assert sum(s["tokens"] for s in manifest["sources"]) == len(tokens)
    for s in manifest["sources"]:
        import hashlib
        data = Path(s["path"]).read_bytes()
        assert s["size"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()


def test_llama2_tokenizer_adds_bos(tmp_path, llama2_tokenizer_dir):
    """A LLaMA-2 vocabulary: each document starts with BOS, as the tokenizer's own encode gives it."""
    from camelid.tokenizer import Tokenizer
    ref = Tokenizer.from_folder(llama2_tokenizer_dir)
    texts = ["Hello world", " leading space", "日本語 and 🦙", "two\nlines"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    m = tokenize_corpus([str(tmp_path / "a.jsonl")], tmp_path / "out", model=str(llama2_tokenizer_dir), field="body",
                        cache_dir=str(tmp_path / "cache"), quiet=True)
    _, tokens, index = read_output(tmp_path / "out")
    assert m["bos_id"] == ref.bos_id == 1
    for doc, text in zip(documents(tokens, index), texts):
        assert doc == ref.encode(text, bos=True, eos=True, special=False)


def test_rerun_is_byte_identical_with_workers_and_fresh_cache(tmp_path):
    write_corpus(tmp_path / "corpus", docs=60)
    runs = [("o1", "cache1", 1), ("o2", "cache1", 1), ("o3", "cache2", 2)]
    for out, cache, workers in runs:
        tokenize_corpus([str(tmp_path / "corpus")], tmp_path / out, cache_dir=str(tmp_path / cache),
                        workers=workers, quiet=True)
    for name in ("tokens.bin", "index.bin", "manifest.json"):
        first = (tmp_path / "o1" / name).read_bytes()
        assert first == (tmp_path / "o2" / name).read_bytes() == (tmp_path / "o3" / name).read_bytes(), name


def test_changed_file_is_read_again(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    cache = str(tmp_path / "cache")
    first = tokenize_corpus([str(tmp_path / "a.txt")], tmp_path / "o1", cache_dir=cache, quiet=True)
    (tmp_path / "a.txt").write_text("one two three four\n")
    second = tokenize_corpus([str(tmp_path / "a.txt")], tmp_path / "o2", cache_dir=cache, quiet=True)
    assert second["tokens"] > first["tokens"]


def test_bad_record_names_file_and_line(tmp_path, camelid_bin):
    lines = [json.dumps({"text": "fine"}), json.dumps({"text": "also fine"}), "{not json", json.dumps({"txt": "x"}),
             json.dumps({"text": 7})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    cmd = [str(camelid_bin), "data", "tokenize", "--source", str(tmp_path / "bad.jsonl"), "--out",
           str(tmp_path / "out"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    one_line_error(proc, f"{tmp_path / 'bad.jsonl'}:3:", "not a JSON record", "--skip-bad", "3 bad")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    proc = subprocess.run(cmd + ["--skip-bad"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest, tokens, index = read_output(tmp_path / "out")
    assert manifest["bad_records"] == 3 and manifest["documents"] == 2 and len(index) == 2


def test_bad_inputs_fail_before_work(tmp_path):
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(CamelidError, match="unknown file type"):
        tokenize_corpus([str(tmp_path / "a.csv")], tmp_path / "out")
    with pytest.raises(CamelidError, match="no such file"):
        tokenize_corpus([str(tmp_path / "missing.jsonl")], tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(CamelidError, match="--force"):
        tokenize_corpus([str(tmp_path / "a.csv")], tmp_path / "out")


def test_sigterm_midway_leaves_nothing(tmp_path, camelid_bin):
    rng = random.Random(1)
    with (tmp_path / "big.jsonl").open("w") as f:
        for _ in range(150000):  # long enough that the signal lands midway even on a fast, idle machine
            f.write(json.dumps({"text": _doc(rng)}) + "\n")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([str(camelid_bin), "data", "tokenize", "--source", str(tmp_path / "big.jsonl"),
                             "--out", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # inside the run: reading or tokenizing
    assert proc.poll() is None, "the run ended before it could be interrupted; make the corpus bigger"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_large_vocabulary_is_written_as_uint32(tmp_path):
    """A vocabulary past 65536 ids (a word-level one here) needs uint32; ids above 65535 survive."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(70000)}
    vocab["[UNK]"], vocab["</s>"] = 70000, 70001
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "add_bos_token": False}))
    (tmp_path / "a.txt").write_text("w1 w69999 w65536\n\nw7 nope\n")
    m = tokenize_corpus([str(tmp_path / "a.txt")], tmp_path / "out", model=str(folder),
                        cache_dir=str(tmp_path / "cache"), quiet=True)
    _, tokens, index = read_output(tmp_path / "out")
    assert m["dtype"] == "uint32" and tokens.dtype == np.uint32
    assert documents(tokens, index) == [[1, 69999, 65536, 70001], [7, 70000, 70001]]
