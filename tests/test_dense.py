"""Float models (bfloat16 / float32 weights) on the native decode step (kernels/dense.py): the float row kernels
against their PyTorch references, and whole models against transformers on the same weights."""
import pytest
import torch

from camelid import kernels
from camelid.kernels import blocks as kb
from tests.builders import kernel_sized_hf

pytestmark = pytest.mark.skipif(kernels.ext() is None, reason="native kernels not built here")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(1, 32), (67, 96), (130, 1056)])
@pytest.mark.parametrize("m", [1, 2, 5, 13])
def test_float_rows_match_the_reference(dtype, rows, cols, m):
    """bf16: activations rounded to bfloat16, float sums (as llama.cpp's BF16 path); f32: exact products; with
    the tails of k not a multiple of 64 (or 32 for f32) and permuted rows."""
    g = torch.Generator().manual_seed(rows + m)
    w = (torch.randn(rows, cols, generator=g) * 0.1).to(dtype)
    x = torch.randn(m, cols, generator=g) * 3
    perm = torch.randperm(rows, generator=g)
    y = kernels.ext().qmatmul(x, [w.view(torch.uint8)], [kb.FLOAT_TYPES[dtype]], [perm])
    same = x.to(dtype).float() @ w.float().T
    want = torch.empty_like(same).index_copy_(1, perm, same)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * float(x.abs().max() * w.float().abs().sum(1).max()))


def test_float_and_block_matrices_side_by_side():
    """One call over a bf16, an f32 and a Q8_0 matrix (its own arithmetic each): column blocks equal each alone."""
    g = torch.Generator().manual_seed(0)
    wb = (torch.randn(40, 64, generator=g) * 0.1).bfloat16()
    wf = torch.randn(24, 64, generator=g) * 0.1
    q8 = kb.from_int8(torch.randint(-127, 128, (16, 64), generator=g, dtype=torch.int8), torch.rand(16, generator=g) / 100)
    parts, types = [wb.view(torch.uint8), wf.view(torch.uint8), q8], [6, 7, 2]
    x = torch.randn(3, 64, generator=g)
    no = [kb.NO_PERM] * 3
    y = kernels.ext().qmatmul(x, parts, types, no)
    alone = torch.cat([kernels.ext().qmatmul(x, [p], [t], [kb.NO_PERM]) for p, t in zip(parts, types)], dim=1)
    assert torch.equal(y, alone)


@pytest.mark.parametrize("dtype,tie", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_float_models_decode_in_one_native_call_with_transformers_logits(tmp_path, dtype, tie):
    """An HF folder loaded for inference at float32 / bfloat16 width runs on the native step over its own
    weights (bf16: embedding and tied output one bfloat16 tensor); its prefill and decode logits equal
    transformers' float32 forward on the same (bf16-rounded) weights within the rounding of the width, and the
    greedy tokens are the same."""
    from transformers import LlamaForCausalLM

    from camelid.engine import load_model
    from camelid.generate import Generation, SamplingParams
    from camelid.prefix_cache import KVSession
    kernel_sized_hf(tmp_path / "hf", tie, seed=5)
    loaded = load_model(tmp_path / "hf", dtype=dtype, fuse=True).model
    assert loaded.fused_step is not None
    qkv = loaded.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, kb.NativeLinear) and qkv.types == [kb.FLOAT_TYPES[dtype]] * 3  # joined, not copied
    if dtype == torch.bfloat16:
        embed = loaded.model.embed_tokens
        assert isinstance(embed, kb.NativeEmbedding) and embed.qtype == 6
        assert (loaded.lm_head.blocks0.data_ptr() == embed.blocks.data_ptr()) == tie
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=dtype).float().eval()
    prompt = [5, 17, 33, 2, 61, 8, 40, 12, 3, 77]  # 10 tokens: a prefill-sized call (oneDNN), then decode steps
    with torch.inference_mode():
        session = KVSession(loaded, 64)
        ours = [session.prefill(prompt)] + [session.step(t) for t in (9, 4, 50)]
        want = theirs(torch.tensor([prompt + [9, 4, 50]])).logits[0, len(prompt) - 1:]
    ours = torch.stack([o.reshape(-1) for o in ours])
    # bf16: products of bf16-rounded activations (and bf16-rounded outputs in the prefill) against float32 ones
    tol = 1e-4 if dtype == torch.float32 else 0.03 * float(want.abs().max())
    torch.testing.assert_close(ours, want, rtol=0, atol=tol)
    tokens = list(Generation(loaded, prompt, SamplingParams(max_new_tokens=12)))
    with torch.inference_mode():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    assert tokens == expected.tolist()


def test_a_model_the_kernels_do_not_fit_keeps_the_pytorch_path(tmp_path):
    """A bias on q/k/v (Qwen2's shape): nothing is swapped, the model runs as before."""
    from torch import nn

    from camelid.config import ModelConfig
    from camelid.kernels.dense import swap_in_float
    from camelid.model import Llama
    model = Llama(ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=1, num_heads=4,
                              num_kv_heads=2, head_dim=16, max_position_embeddings=128))
    attn = model.model.layers[0].self_attn
    attn.q_proj = nn.Linear(64, 64, bias=True)
    assert not swap_in_float(model)
    assert type(attn.k_proj) is nn.Linear and type(model.lm_head) is nn.Linear
