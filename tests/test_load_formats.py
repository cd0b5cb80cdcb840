"""`--model` opens every format `camelid convert` reads, through the format registry: one tiny random model
(transformers' own save, with the LLaMA-2 tokenizer) is converted by `camelid convert` into a Meta folder, float and
Q8_0 GGUF files, a .flm file and an EasyLM folder; every copy loads to transformers' logits and generates
transformers' greedy tokens. `generate`, `serve` and `train` run on the copies as a user runs them."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from camelid.convert import convert
from camelid.engine import load_model
from camelid.errors import CamelidError
from camelid.generate import Generation, SamplingParams

PROMPT = "The quick brown fox"
NEW = 12
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def copies(tmp_path_factory, llama2_tokenizer_dir) -> dict[str, tuple[str, dict]]:
    """Format -> (what to pass as --model, extra load options); "hf" is transformers' own save."""
    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = root / "hf"
    LlamaForCausalLM(cfg).save_pretrained(hf)
    for f in llama2_tokenizer_dir.glob("*.json"):
        shutil.copyfile(f, hf / f.name)
    convert(str(hf), root / "meta", "meta", progress=False)
    convert(str(hf), root / "model.gguf", "gguf", progress=False)
    convert(str(hf), root / "model-q8_0.gguf", "gguf", quant="q8_0", progress=False)
    convert(str(hf), root / "model.flm", "flm", progress=False)
    convert(str(hf), root / "easylm", "easylm", progress=False)
    bare = root / "bare"  # an EasyLM file as EasyLM writes it: no config, no tokenizer beside it
    bare.mkdir()
    shutil.copyfile(root / "easylm" / "streaming_params", bare / "streaming_params")
    return {"hf": (str(hf), {}), "meta": (str(root / "meta"), {}), "gguf": (str(root / "model.gguf"), {}),
            "gguf-q8_0": (str(root / "model-q8_0.gguf"), {}), "flm": (str(root / "model.flm"), {}),
            "easylm": (f"params::{root / 'easylm' / 'streaming_params'}", {}),
            "easylm-bare": (f"params::{bare / 'streaming_params'}",
                            {"config": str(hf / "config.json"), "tokenizer": str(hf)})}


@pytest.fixture(scope="module")
def reference(copies) -> tuple[list[int], torch.Tensor, list[int]]:
    """transformers on the HF copy: prompt ids, logits, greedy tokens."""
    from transformers import AutoTokenizer
    path = copies["hf"][0]
    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return ids, logits, out[0, len(ids):].tolist()


FLOAT = ["hf", "meta", "gguf", "flm", "easylm", "easylm-bare"]


@pytest.mark.parametrize("fmt", FLOAT + ["gguf-q8_0"])
def test_every_format_loads_to_transformers_logits_and_greedy_tokens(copies, reference, fmt) -> None:
    spec, options = copies[fmt]
    ids, logits, greedy = reference
    loaded = load_model(spec, **options)
    assert loaded.tokenizer.encode(PROMPT, bos=True) == ids
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0]
    if fmt == "gguf-q8_0":  # dequantized Q8_0: close, not equal
        assert (ours - logits).abs().max() < 0.05 * logits.abs().max()
        return
    torch.testing.assert_close(ours, logits, atol=2e-5, rtol=1e-4)
    tokens = list(Generation(loaded.model, ids, SamplingParams(max_new_tokens=NEW, temperature=0.0)))
    assert tokens == greedy


def test_quantized_gguf_keeps_its_blocks(copies, reference) -> None:
    loaded = load_model(copies["gguf-q8_0"][0], quant="native")
    assert loaded.quant and all(s in ("GGUF blocks", "int8 g32 x2") for s in loaded.quant.values())
    ids, logits, _ = reference
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0]
    assert (ours - logits).abs().max() < 0.05 * logits.abs().max()


def camelid(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camelid.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_generate_command_gives_the_same_text_from_every_copy(copies) -> None:
    texts = {}
    for fmt in FLOAT:
        spec, options = copies[fmt]
        extra = [a for k, v in options.items() for a in (f"--{k}", v)]
        proc = camelid("generate", "--model", spec, *extra, "--max-new-tokens", str(NEW), "--ignore-eos",
                       "--threads", "1", PROMPT)
        assert proc.returncode == 0, proc.stderr
        texts[fmt] = proc.stdout
    assert len(set(texts.values())) == 1 and texts["hf"].strip(), texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fmt", ["meta", "flm"])
def test_serve_answers_a_chat_request(copies, fmt) -> None:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "camelid.cli", "serve", "--model", copies[fmt][0], "--port",
                               str(port), "--threads", "1", "--template", "llama-2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        models = None
        for _ in range(600):
            try:
                models = httpx.get(f"{url}/v1/models", timeout=2)
                break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.5)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": models.json()["data"][0]["id"], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] > 0 and isinstance(body["choices"][0]["message"]["content"], str)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_train_starts_from_a_meta_copy(copies, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": f"t{i}", "source": "test", "preferred": True,
             "messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} it is"}]}
            for i in range(8)]
    for split in ("train", "eval"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = camelid("train", "--model", copies["meta"][0], "--data", str(data), "--out", str(tmp_path / "run"),
                   "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--template", "llama-2", "--quiet",
                   "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 2


@pytest.mark.parametrize("model, extra, words", [
    ("missing-folder", [], "no such file or folder"),
    ("notes.txt", [], "unknown checkpoint file type"),
    ("bogus::x", [], "unknown load spec prefix"),
    ("params::BARE", [], "carries no model config"),
    ("params::BARE", ["--config", "no-such-preset"], "unknown model preset"),
])
def test_bad_model_paths_are_one_line_before_loading(copies, tmp_path, model, extra, words) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    bare = copies["easylm-bare"][0].removeprefix("params::")
    model = model.replace("BARE", bare).replace("notes.txt", str(tmp_path / "notes.txt"))
    proc = camelid("generate", "--model", model, *extra, "hi")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camelid: error:") and words in lines[0], proc.stderr
    assert "loading" not in proc.stderr


def test_load_model_refuses_a_wrong_config_before_reading(copies) -> None:
    spec, _ = copies["easylm-bare"]
    with pytest.raises(CamelidError, match="has shape .* but the config implies"):
        load_model(spec, config="7b")
