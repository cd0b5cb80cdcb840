"""`--model` opens every format `camelid convert` reads, through the format registry: the shared tiny model
(transformers' own save, converted by `camelid convert` into a Meta folder, a bare EasyLM params file, float32 and
Q8_0 GGUF files and a .flm file: conftest's `tiny_formats`) loads from every copy to transformers' logits and
greedy tokens; `generate`, `serve` and `train` run on the copies as a user runs them; bad paths are one line."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from camelid.engine import load_model
from camelid.errors import CamelidError
from camelid.generate import Generation, SamplingParams

from .builders import write_data
from .helpers import ENV, one_line_error

PROMPT = "The quick brown fox"
NEW = 12
FLOAT = ["hf", "meta", "easylm", "gguf", "flm"]


def _load(args: list[str], **kwargs):
    """load_model with the same arguments the command line takes (`PATH [--config C] [--tokenizer T]`)."""
    options = {args[i].removeprefix("--"): args[i + 1] for i in range(1, len(args), 2)}
    return load_model(args[0], **options, **kwargs)


@pytest.fixture(scope="module")
def reference(tiny_formats) -> tuple[list[int], torch.Tensor, list[int]]:
    """transformers on the HF copy: prompt ids, logits, greedy tokens."""
    path = tiny_formats["hf"][0]
    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return ids, logits, out[0, len(ids):].tolist()


@pytest.mark.parametrize("fmt", FLOAT + ["gguf-q8_0"])
def test_every_format_loads_to_transformers_logits_and_greedy_tokens(tiny_formats, reference, fmt) -> None:
    ids, logits, greedy = reference
    loaded = _load(tiny_formats[fmt], quant="none")
    assert loaded.tokenizer.encode(PROMPT, bos=True) == ids
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0]
    if fmt == "gguf-q8_0":  # dequantized Q8_0: close, not equal
        assert (ours - logits).abs().max() < 0.05 * logits.abs().max()
        return
    torch.testing.assert_close(ours, logits, atol=2e-5, rtol=1e-4)
    assert list(Generation(loaded.model, ids, SamplingParams(max_new_tokens=NEW, temperature=0.0))) == greedy


def test_quantized_gguf_keeps_its_blocks(tiny_formats, reference) -> None:
    loaded = _load(tiny_formats["gguf-q8_0"], quant="native")
    assert loaded.quant and set(loaded.quant.values()) <= {"GGUF blocks", "int8 g32"}
    ids, logits, _ = reference
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0]
    assert (ours - logits).abs().max() < 0.05 * logits.abs().max()


def test_generate_command_gives_the_same_text_from_every_copy(tiny_formats, cli) -> None:
    texts = {}
    for fmt in FLOAT:
        proc = cli("generate", "--model", *tiny_formats[fmt], "--max-new-tokens", NEW, "--ignore-eos",
                   "--threads", 1, PROMPT)
        assert proc.returncode == 0, proc.stderr
        texts[fmt] = proc.stdout
    assert len(set(texts.values())) == 1 and texts["hf"].strip(), texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fmt", ["meta", "flm"])
def test_serve_answers_a_chat_request(tiny_formats, camelid_bin, fmt) -> None:
    port = _free_port()
    server = subprocess.Popen([str(camelid_bin), "serve", "--model", *tiny_formats[fmt], "--port", str(port),
                               "--threads", "1", "--template", "llama-2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                models = httpx.get(f"{url}/v1/models", timeout=2)
                break
            except httpx.HTTPError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": models.json()["data"][0]["id"], "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 5, "temperature": 0})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] > 0 and isinstance(body["choices"][0]["message"]["content"], str)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_train_starts_from_a_meta_copy(tiny_formats, cli, tmp_path) -> None:
    data = write_data(tmp_path / "data", n_train=8, n_eval=2)
    proc = cli("train", "--model", *tiny_formats["meta"], "--data", data, "--out", tmp_path / "run", "--max-steps", 2,
               "--seq-len", 32, "--batch-size", 2, "--template", "llama-2", "--quiet", "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 2


@pytest.mark.parametrize("model, extra, words", [
    ("MISSING", [], "no such file or folder"),
    ("NOTES", [], "unknown checkpoint file type"),
    ("bogus::NOTES", [], "unknown load spec prefix"),
    ("BARE", [], "carries no model config"),
    ("BARE", ["--config", "no-such-preset"], "unknown model preset"),
    ("BARE", ["--config", "CONFIG", "--tokenizer", "MISSING"], "--tokenizer"),
])
def test_bad_model_paths_are_one_line_before_loading(tiny_formats, cli, tmp_path, model, extra, words) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    easylm = tiny_formats["easylm"]
    names = {"MISSING": str(tmp_path / "missing"), "NOTES": str(tmp_path / "notes.txt"), "BARE": easylm[0],
             "CONFIG": easylm[2]}
    model = model.replace("NOTES", names["NOTES"]) if model.startswith("bogus::") else names[model]
    proc = cli("generate", "--model", model, *(names.get(a, a) for a in extra), "hi")
    one_line_error(proc, words)
    assert proc.stdout == "" and "loading" not in proc.stderr


def test_load_model_refuses_a_wrong_config_before_reading(tiny_formats) -> None:
    with pytest.raises(CamelidError, match="has shape .* but the config implies"):
        load_model(tiny_formats["easylm"][0], config="7b")
