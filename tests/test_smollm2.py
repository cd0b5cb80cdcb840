"""The built-in SmolLM2-135M-Instruct GGUF: our logits and greedy text against transformers' own GGUF loading."""
from __future__ import annotations

import pytest
import torch

from camelid.engine import load_model
from camelid.generate import Generation, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "<|im_start|>user\nWrite a haiku about llamas.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
    "Les lamas vivent dans les Andes, où",
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_model(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_config_from_gguf(ours) -> None:
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 1536, 9, 3, 64)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings and c.vocab_size == 49152
    assert ours.tokenizer is not None and "<|im_start|>" in ours.chat_template


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_equal_transformers_gguf_loading(ours, reference, prompt: str) -> None:
    model, tokenizer = reference
    ids = ours.tokenizer.encode(prompt)
    assert ids == tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits
        got = ours.model(torch.tensor([ids]))
    assert (expected - got).abs().max().item() < 1e-3


def test_32_greedy_tokens_equal_transformers(ours, reference) -> None:
    model, _ = reference
    ids = ours.tokenizer.encode(PROMPTS[1])
    expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    got = list(Generation(ours.model, ids, SamplingParams(max_new_tokens=32)))
    assert got == expected
    assert len(got) == 32
