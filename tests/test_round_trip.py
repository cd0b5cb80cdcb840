"""The built-in model through every format and back: GGUF -> HF -> Meta -> EasyLM -> GGUF (f16 and q8_0) ->
.flm -> HF. At every step the tokenizer gives the original's ids on a multilingual text, the chat template
renders the same, `camelid generate` gives the same greedy tokens wherever the weights are lossless, and
transformers loads every HF folder (tokenizer and model).

Meta and EasyLM checkpoints carry no tokenizer of their own: camelid writes the source's tokenizer files
(tokenizer.json, tokenizer_config.json with the template, special_tokens_map.json) beside the weights in the
output folder, so the next conversion finds them without --tokenizer."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from camelid.formats.gguf import tokenizer_of as gguf_tokenizer
from camelid.chat import template_from_hf
from camelid.convert import convert
from camelid.tokenizer import Tokenizer

TEXT = ("The capital of France is Paris. 東京は日本の首都です。Москва — столица России. "
        "¿Dónde está la biblioteca? Ελληνικά 1234567 🐪🦙\n\tcode: def f(x): return x**2  # done")
MESSAGES = [{"role": "user", "content": "Name a camel. 🐪"}, {"role": "assistant", "content": "Bactrian."},
            {"role": "user", "content": "And a llama?"}]
PROMPT = "The three largest cities of Japan are"


def tokenizer_of(step: Path) -> Tokenizer:
    if step.is_dir():
        return Tokenizer.from_folder(step)
    if step.suffix == ".gguf":
        return gguf_tokenizer(step)
    from camelid.formats.flm import FLMReader
    reader = FLMReader(step)
    try:
        return Tokenizer.from_folder(reader.tokenizer_dir())
    finally:
        reader.close()


def rendered(tok: Tokenizer) -> str:
    template = template_from_hf(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    return template.render_text(MESSAGES, add_generation_prompt=True)


def greedy(camelid_bin: Path, model: Path) -> str:
    proc = subprocess.run([str(camelid_bin), "generate", "--model", str(model), "--max-new-tokens", "12", PROMPT],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_builtin_model_round_trip_through_every_format(smollm2_gguf: Path, tmp_path: Path, camelid_bin: Path) -> None:
    source = tokenizer_of(smollm2_gguf)
    ids, chat = source.encode(TEXT), rendered(source)
    assert len(set(ids)) > 40 and "<|im_start|>assistant" in chat
    steps = {"hf": tmp_path / "m-hf", "meta": tmp_path / "m-meta", "easylm": tmp_path / "m-easylm",
             "f16": tmp_path / "m-f16.gguf", "q8_0": tmp_path / "m-q8_0.gguf", "flm": tmp_path / "m.flm",
             "back": tmp_path / "back-hf"}
    convert(str(smollm2_gguf), steps["hf"], "hf", progress=False)
    convert(str(steps["hf"]), steps["meta"], "meta", progress=False)
    convert(str(steps["meta"]), steps["easylm"], "easylm", progress=False)
    convert(f"params::{steps['easylm']}", steps["f16"], "gguf", dtype="float16", progress=False)
    convert(f"params::{steps['easylm']}", steps["q8_0"], "gguf", quant="q8_0", progress=False)
    convert(str(steps["q8_0"]), steps["flm"], "flm", progress=False)
    convert(str(steps["flm"]), steps["back"], "hf", progress=False)
    for name, step in steps.items():
        tok = tokenizer_of(step)
        assert tok.encode(TEXT) == ids, name
        assert rendered(tok) == chat, name
    for name in ("hf", "back"):  # transformers reads both HF folders: the same ids, template and a working model
        hf_tok = AutoTokenizer.from_pretrained(steps[name])
        assert hf_tok.encode(TEXT) == ids, name
        assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == chat, name
        model = AutoModelForCausalLM.from_pretrained(steps[name], dtype=torch.float32)
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([ids[:16]])).logits).all()
        del model
    # Lossless links give the same greedy tokens: Q4_1 -> float32 HF (exact), and q8_0 -> float32 .flm -> HF.
    original = greedy(camelid_bin, smollm2_gguf)
    assert original.strip() and greedy(camelid_bin, steps["hf"]) == original
    assert greedy(camelid_bin, steps["back"]) == greedy(camelid_bin, steps["q8_0"])
