"""Our LLaMA against transformers.LlamaForCausalLM with the same random weights."""
from __future__ import annotations

import pytest
import torch

from camelid.config import ModelConfig
from camelid.model import Llama

from .builders import CASES, ours_from, reference

@pytest.mark.parametrize("case", list(CASES))
def test_full_forward_matches_transformers(case: str) -> None:
    ref = reference(case)
    ours = ours_from(ref)
    tokens = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ref(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < 1e-4, f"{case}: max |diff| {diff}"


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_cached_decode_match_transformers(case: str) -> None:
    ref = reference(case)
    ours = ours_from(ref)
    tokens = torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ref(tokens[:, :10], use_cache=True)
        past, expected = out.past_key_values, [out.logits]
        for t in range(10, 24):
            out = ref(tokens[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            expected.append(out.logits)
        ours.setup_cache(1, 32)
        got = [ours(tokens[:, :10], torch.arange(10))]
        got += [ours(tokens[:, t:t + 1], torch.tensor([t])) for t in range(10, 24)]
    diff = (torch.cat(expected, 1) - torch.cat(got, 1)).abs().max().item()
    assert diff < 1e-4, f"{case}: max |diff| {diff}"


def test_chunked_prefill_equals_single_prefill() -> None:
    ours = ours_from(reference("gqa"))
    tokens = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = ours(tokens)
        ours.setup_cache(1, 32)
        first = ours(tokens[:, :7], torch.arange(7))
        second = ours(tokens[:, 7:], torch.arange(7, 20))
    assert (torch.cat([first, second], 1) - whole).abs().max().item() < 1e-4


def test_rope_scaling_changes_the_output() -> None:
    # Guards the comparisons above against a scaling that is silently ignored on both sides.
    ref = reference("llama3")
    ours = ours_from(ref)
    plain = ours_from(reference("gqa"))
    plain.load_state_dict(ours.state_dict())
    tokens = torch.arange(24)[None] % 101
    with torch.no_grad():
        assert (ours(tokens) - plain(tokens)).abs().max().item() > 1e-3


def test_config_presets_and_tiny() -> None:
    for name, params in [("llama-7b", 6.74e9), ("llama-13b", 13.0e9), ("llama-2-70b", 69.0e9), ("smollm2-135m", 0.1345e9)]:
        config = ModelConfig.from_name(name)
        assert abs(config.num_params - params) / params < 0.01, name
    tiny = ModelConfig.from_name("llama-2-70b").tiny()
    assert (tiny.num_layers, tiny.hidden_size) == (2, 64) and tiny.num_kv_heads < tiny.num_heads
    model = Llama(tiny)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, tiny.vocab_size)


def test_config_reads_transformers_4_and_5_layouts() -> None:
    v5 = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}}
    v4 = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}
    for d in (v4, v5):
        c = ModelConfig.from_hf_dict(d)
        assert (c.rope_theta, c.rope_scaling, c.num_kv_heads) == (5e5, {"type": "linear", "factor": 4.0}, 2)
    back = ModelConfig.from_hf_dict(ModelConfig.from_hf_dict(v5).to_hf_dict())
    assert back == ModelConfig.from_hf_dict(v5)


def test_meta_params() -> None:
    c = ModelConfig.from_meta_params({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                                      "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-5, "vocab_size": 32000})
    assert c == ModelConfig.from_name("llama-2-70b")
    c = ModelConfig.from_meta_params({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                                      "norm_eps": 1e-6, "vocab_size": -1}, vocab_size=32000, max_position_embeddings=2048)
    assert c == ModelConfig.from_name("llama-7b")


@pytest.mark.parametrize("head_dim", [16, 64])
def test_batched_decode_of_different_lengths_equals_single_sequences(head_dim: int) -> None:
    config = ModelConfig.from_name("llama-2-70b").tiny(head_dim=head_dim, hidden_size=4 * head_dim, vocab_size=101)
    torch.manual_seed(0)
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]
    steps = [[30, 31, 32], [40, 41, 42], [50, 51, 52]]
    with torch.no_grad():
        expected = [model(torch.tensor([p + s]))[0, len(p):] for p, s in zip(prompts, steps)]
        model.setup_cache(4, 32)
        rows = torch.tensor([2, 0, 3])  # sequences need not sit in the first rows
        for row, prompt in zip(rows.tolist(), prompts):  # prefill one by one into their rows
            model(torch.tensor([prompt]), torch.arange(len(prompt)), rows=torch.tensor([row]))
        got = []
        for t in range(3):
            tokens = torch.tensor([[s[t]] for s in steps])
            positions = torch.tensor([[len(p) + t] for p in prompts])
            got.append(model(tokens, positions, rows=rows)[:, 0])
    for i in range(3):
        diff = (torch.stack([g[i] for g in got]) - expected[i]).abs().max().item()
        assert diff < 1e-4, f"sequence {i}: {diff}"
