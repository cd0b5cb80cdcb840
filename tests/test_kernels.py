"""Native kernels against their PyTorch references (dequantize, then matmul) and against gguf's own quantizer
and dequantizer, for every block type, odd shapes and 1-8 (and prefill-sized) rows of activations."""
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from camelid import kernels
from camelid.kernels import blocks as kb
from tests.builders import kernel_sized_hf

pytestmark = pytest.mark.skipif(kernels.ext() is None, reason="native kernels not built here")
QTYPES = ["Q4_0", "Q4_1", "Q8_0"]


def make_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real GGUF blocks made by gguf's own quantizer from random weights; (blocks, the float weights)."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(q).view(np.uint8).reshape(rows, -1)), torch.from_numpy(w)


def error_bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|x w - q(x) w| <= sum over blocks of |w|_1 * dx / 2 (each activation moves by at most half a step),
    plus float32 rounding of the sums."""
    dx = x.reshape(x.shape[0], -1, 32).abs().amax(-1) / 127  # (m, blocks)
    wabs = w.abs().reshape(w.shape[0], -1, 32).sum(-1)  # (n, blocks)
    return (dx / 2) @ wabs.T + 1e-4 * (x.abs() @ w.abs().T) + 1e-5


@pytest.mark.parametrize("qtype", QTYPES)
def test_reference_dequantize_equals_gguf(qtype):
    b, _ = make_blocks(qtype, 7, 96)
    ours = kb.dequantize(b, kb.TYPES[qtype])
    theirs = gguf.quants.dequantize(b.numpy(), gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 32), (67, 96), (130, 160), (257, 1056)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13])
def test_qmatmul_matches_reference(qtype, rows, cols, m):
    b, _ = make_blocks(qtype, rows, cols, seed=rows + m)
    t = kb.TYPES[qtype]
    w = kb.dequantize(b, t)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)) * 3
    y = kernels.ext().qmatmul(x, [b], [t], [kb.NO_PERM])
    # Same math as the kernel (int8 activations): only float rounding apart.
    same = kb.quantize_activations(x) @ w.T
    torch.testing.assert_close(y, same, rtol=1e-4, atol=1e-4 * float(x.abs().max() * w.abs().sum(1).max()))
    # Against float activations: within the documented bound of the int8 rounding.
    exact = x.double() @ w.double().T
    assert ((y.double() - exact).abs() <= error_bound(w, x).double()).all()


def test_prefill_sized_batch_and_side_by_side_matrices_with_perm():
    """128 rows of activations, three matrices of different types in one call, one with its rows permuted."""
    parts = [make_blocks(q, r, 192, seed=i)[0] for i, (q, r) in enumerate([("Q4_0", 40), ("Q8_0", 24), ("Q4_1", 9)])]
    types = [0, 2, 1]
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    x = torch.randn(128, 192)
    y = kernels.ext().qmatmul(x, parts, types, [kb.NO_PERM, perm, kb.NO_PERM])
    module = kb.NativeLinear([(parts[0], 0, kb.NO_PERM), (parts[1], 2, perm), (parts[2], 1, kb.NO_PERM)])
    same = kb.quantize_activations(x) @ module.reference_weight().T
    torch.testing.assert_close(y, same, rtol=1e-4, atol=2e-3)
    # few rows: the decode kernel, the same int8 sums (on plain rows, float sums in another order)
    torch.testing.assert_close(module(x[:5]), y[:5], rtol=1e-5, atol=1e-5)
    assert torch.equal(module(x), prefill_run()(x, parts, types, [kb.NO_PERM, perm, kb.NO_PERM]))


def prefill_run():
    """What NativeLinear runs for prefill-sized inputs: the int8 tile kernel where built, else bfloat16 tiles."""
    return kernels.ext().qmatmul if kernels.ext().has_tile_kernel() else kernels.ext().qmatmul_bf16


@pytest.mark.skipif(kernels.ext() is None or not kernels.ext().has_tile_kernel(), reason="no AVX512-VNNI tile kernel")
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,cols", [(8, 32), (67, 96), (130, 1056)])
@pytest.mark.parametrize("m", [12, 16, 17, 37])
@pytest.mark.parametrize("packed", [True, False])
def test_tile_kernel_equals_the_decode_kernel_bit_for_bit(qtype, rows, cols, m, packed):
    """Prefill-sized products (8 rows x 16 tokens per step, padding tokens in the last tile, rows % 8 through the
    decode kernel) give every token exactly what the decode kernel gives it alone on repacked blocks: the same
    int8 rounding, exact integer block sums and the same float operations in the same order. Plain blocks too,
    permuted rows, and within float rounding of the reference."""
    b, _ = make_blocks(qtype, rows, cols, seed=rows + m)
    t = kb.TYPES[qtype]
    if packed:
        b, t = kernels.ext().repack(b, t, False)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(m))
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)) * 3
    x[m // 2] = 0  # an all-zero token: scale 0
    y = kernels.ext().qmatmul(x, [b], [t], [perm])
    alone = torch.cat([kernels.ext().qmatmul(x[i:i + 1], [b], [t], [perm]) for i in range(m)])
    grouped = perm[:rows // 8 * 8]  # output columns of the rows in whole groups of 8 (the rest: decode kernel)
    if packed:  # the decode kernel's repacked path: the same operations
        assert torch.equal(y[:, grouped], alone[:, grouped])
    # its plain path sums a row's blocks in 8 float lanes, then across them
    torch.testing.assert_close(y, alone, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    w = torch.empty(rows, cols).index_copy_(0, perm, kb.dequantize(b, t))
    same = kb.quantize_activations(x) @ w.T
    torch.testing.assert_close(y, same, rtol=1e-4, atol=1e-4 * float(x.abs().max() * w.abs().sum(1).max()))


@pytest.mark.skipif(kernels.ext() is None or not kernels.ext().has_tile_kernel(), reason="no AVX512-VNNI tile kernel")
def test_tile_kernel_with_matrices_side_by_side():
    """q/k/v-like joins of three types, repacked and plain, odd row counts, one permuted: each column block
    equals its matrix alone."""
    specs = [("Q4_0", 40, True), ("Q8_0", 27, False), ("Q4_1", 9, True), ("Q4_0", 19, False), ("Q8_0", 16, True)]
    parts, types = [], []
    for i, (q, r, packed) in enumerate(specs):
        b, t = make_blocks(q, r, 192, seed=i)[0], kb.TYPES[q]
        b, t = kernels.ext().repack(b, t, False) if packed else (b, t)
        parts.append(b)
        types.append(t)
    perms = [kb.NO_PERM, torch.randperm(27, generator=torch.Generator().manual_seed(3))] + [kb.NO_PERM] * 3
    x = torch.randn(33, 192)
    y = kernels.ext().qmatmul(x, parts, types, perms)
    alone = torch.cat([kernels.ext().qmatmul(x, [b], [t], [p]) for b, t, p in zip(parts, types, perms)], dim=1)
    assert torch.equal(y, alone)
    for i in (0, 16, 32):
        torch.testing.assert_close(y[i:i + 1], kernels.ext().qmatmul(x[i:i + 1], parts, types, perms),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,m", [(67, 8), (1100, 37)])
def test_prefill_path_matches_reference(qtype, rows, m):
    """The prefill path (bfloat16 weight tiles of 1024 rows, oneDNN matmul): within bfloat16 rounding of both
    operands (2**-8 relative each) of the float reference; the tiles' edges (1100 rows) included."""
    b, _ = make_blocks(qtype, rows, 160, seed=rows)
    t = kb.TYPES[qtype]
    w = kb.dequantize(b, t)
    x = torch.randn(m, 160, generator=torch.Generator().manual_seed(m))
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(2))
    y = kernels.ext().qmatmul_bf16(x, [b], [t], [perm])
    exact = torch.empty_like(w).index_copy_(0, perm, w)
    bound = (x.abs() @ exact.abs().T) * 2 ** -7 + 1e-5
    assert ((y - x @ exact.T).abs() <= bound).all()
    assert bool(torch.equal(kb.NativeLinear([(b, t, perm)])(x), prefill_run()(x, [b], [t], [perm])))


@pytest.mark.parametrize("qtype", QTYPES)
def test_embedding_rows(qtype):
    b, _ = make_blocks(qtype, 50, 96)
    emb = kb.NativeEmbedding(b, kb.TYPES[qtype])
    idx = torch.tensor([[3, 0, 49], [7, 7, 1]])
    torch.testing.assert_close(emb(idx), kb.dequantize(b, kb.TYPES[qtype])[idx], rtol=0, atol=0)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_and_int8_layouts_become_blocks(group):
    from camelid import quantize as qz
    w = torch.randn(70, 256)
    q, s, z = qz.quantize_grouped(w, group, 4, torch.float32)
    ours = qz.dequantize_grouped(q, s, z, 4)
    as_blocks = kb.dequantize(kb.from_int4(q, s, z), kb.TYPES["Q4_1"])
    # Only the float16 rounding (half a unit in 2**-11) of scale d and offset m = z - 8 s: |dq| <= 15 |dd| + |dm|.
    smax, zmax = float(s.abs().max()), float(z.abs().max())
    torch.testing.assert_close(as_blocks, ours, rtol=0, atol=(15 * smax + zmax + 8 * smax) / 2048 * 1.01)
    q8, s8 = qz.quantize_int8(w, torch.bfloat16)
    torch.testing.assert_close(kb.dequantize(kb.from_int8(q8, s8), kb.TYPES["Q8_0"]), qz.dequantize_int8(q8, s8))


def test_fallback_without_extension_prints_one_notice(tmp_path):
    """CAMELID_NO_KERNELS=1: the reference path runs, with one notice line, and gives the float answer."""
    code = ("import torch, sys; from camelid.kernels import blocks as kb; "
            "b = torch.load(sys.argv[1]); m = kb.NativeLinear([(b, 1, kb.NO_PERM)]); x = torch.ones(2, 64); "
            "m(x); print(float((m(x) - x @ kb.dequantize(b, 1).T).abs().max()))")
    b, _ = make_blocks("Q4_1", 5, 64)
    torch.save(b, tmp_path / "b.pt")
    env = {**os.environ, "CAMELID_NO_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.pt")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    notices = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(notices) == 1 and notices[0].startswith("camelid: notice: native kernels unavailable"), out.stderr
    assert float(out.stdout) < 1e-5


def test_cli_runs_a_quantized_gguf_natively_and_falls_back_with_one_notice(smollm2_gguf, tmp_path):
    """`camelid generate` on the built-in Q4_1 file: native by default (no notice); with the extension disabled
    the same command still answers, after exactly one notice line."""
    args = [sys.executable, "-m", "camelid.cli", "generate", "--max-new-tokens", "6", "--threads", "1",
            "The capital of France is"]
    native = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert native.returncode == 0 and native.stdout.strip() and "notice" not in native.stderr, native.stderr
    env = {**os.environ, "CAMELID_NO_KERNELS": "1"}
    slow = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert slow.returncode == 0 and slow.stdout.strip(), slow.stderr
    # The loader's own "loading NAME (N MB)..." line aside, exactly one line more: the notice.
    lines = [line for line in slow.stderr.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("camelid: notice: native kernels unavailable"), slow.stderr


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,cols", [(8, 32), (67, 96), (130, 1056)])
def test_repack_matches_reference_and_round_trips(qtype, rows, cols):
    """The native repack (8 rows interleaved, tail rows plain) equals the PyTorch reference byte for byte, and
    unpacking gives the file's blocks back."""
    b, _ = make_blocks(qtype, rows, cols, seed=rows)
    t = kb.TYPES[qtype]
    packed, pt = kb.repack(b, t)
    assert pt == t + kb.PACKED and packed.shape == b.shape and packed.data_ptr() != b.data_ptr()
    assert torch.equal(packed, kb.pack(b, t))
    assert torch.equal(kb.unpack(packed, pt), b)
    assert not torch.equal(packed[:8], b[:8])  # really interleaved
    assert torch.equal(kb.dequantize(packed, pt), kb.dequantize(b, t))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,cols", [(8, 32), (67, 96), (257, 1056)])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 8, 13])
def test_repacked_products_equal_the_plain_ones(qtype, rows, cols, m):
    """Decode products on repacked blocks: the same integer dot products as the plain kernel (float sums in
    another order only), with a row permutation; embedding rows and the prefill path bit for bit."""
    b, _ = make_blocks(qtype, rows, cols, seed=rows + m)
    t = kb.TYPES[qtype]
    packed, pt = kb.repack(b, t)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(m))
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)) * 3
    plain = kernels.ext().qmatmul(x, [b], [t], [perm])
    ours = kernels.ext().qmatmul(x, [packed], [pt], [perm])
    w = kb.dequantize(b, t)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5 * float(x.abs().max() * w.abs().sum(1).max()))
    assert torch.equal(kernels.ext().qmatmul_bf16(x, [packed], [pt], [perm]),
                       kernels.ext().qmatmul_bf16(x, [b], [t], [perm]))
    idx = torch.tensor([0, rows - 1, rows // 2, 7 % rows])
    assert torch.equal(kb.NativeEmbedding(packed, pt)(idx), kb.NativeEmbedding(b, t)(idx))


def test_repacked_and_plain_matrices_side_by_side():
    """q/k/v-like joins: repacked and plain matrices of different types and odd row counts in one call."""
    parts = [make_blocks(q, r, 192, seed=i)[0] for i, (q, r) in enumerate([("Q4_0", 40), ("Q8_0", 27), ("Q4_1", 9)])]
    types = [0, 2, 1]
    packed = [kb.repack(b, t) for b, t in zip(parts, types)]
    x = torch.randn(3, 192)
    no = [kb.NO_PERM] * 3
    y = kernels.ext().qmatmul(x, [p for p, _ in packed], [t for _, t in packed], no)
    torch.testing.assert_close(y, kernels.ext().qmatmul(x, parts, types, no), rtol=1e-5, atol=1e-4)


def test_build_folder_is_keyed_by_cpu_flags_and_compiler():
    """A kernel cache copied to a CPU with other flags (or built by another compiler) is not the folder this
    machine loads: it gets a build of its own instead of crashing on instructions it lacks."""
    flags, cc = kernels.cpu_flags(), kernels.compiler_version()
    key = kernels.build_key(flags, cc)
    assert kernels.cache_dir().name == key and kernels.build_key(flags, cc) == key
    fewer = " ".join(f for f in flags.split() if not f.startswith("avx512"))
    assert kernels.build_key(fewer, cc) != key
    assert kernels.build_key(flags, cc + " (another)") != key
    assert kernels.cache_dir().parent == kernels.cache_root()
    assert (kernels.cache_dir() / "camelid_kernels.so").exists()  # the loaded build lives under the key


def test_a_build_killed_midway_does_not_block_later_runs():
    """torch's build leaves its `lock` file behind when the process dies mid-build (Ctrl-C, a timeout), and torch
    then waits on it forever; camelid serialises builds with an OS lock instead and clears the stale file."""
    stale = kernels.cache_dir() / "lock"
    stale.touch()
    proc = subprocess.run([sys.executable, "-m", "camelid.kernels"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists()


@pytest.mark.parametrize("quant,tie", [("int4", False), ("int8", False), ("int4", True)])
def test_own_quantization_of_a_float_model_runs_on_the_block_kernels(tmp_path, quant, tie):
    """`--quant int4/int8` on a float HF model: every matrix becomes repacked Q4_1 (int4) or plain Q8_0 (int8 and
    int4's output) blocks holding the PyTorch path's integers, decoded by the one-call native step. Against the PyTorch
    path in exact float32 arithmetic: weights within the float16 rounding of scale and offset, logits within
    the int8 activation bound (5% of the largest logit), the same greedy tokens up to a near tie (int4: all 24 here)."""
    from camelid import quantize as qz
    from camelid.engine import load_model
    from camelid.generate import Generation, SamplingParams
    from camelid.prefix_cache import KVSession
    state = kernel_sized_hf(tmp_path / "hf", tie)
    native = load_model(tmp_path / "hf", quant=quant, fuse=True).model
    reference = load_model(tmp_path / "hf", quant=quant, act_dtype=torch.float32, fuse=True).model
    assert native.fused_step is not None
    layer = native.model.layers[1]
    for module, t in ((layer.self_attn.qkv_proj, "Q4_1" if quant == "int4" else "Q8_0"), (native.lm_head, "Q8_0")):
        # Q4_1 repacked, Q8_0 kept as made (blocks.load_layout)
        assert isinstance(module, kb.NativeLinear) and set(module.types) == {kb.TYPES[t] + (t == "Q4_1") * kb.PACKED}
    w = state["model.layers.1.mlp.down_proj.weight"]
    if quant == "int4":
        q, s, z = qz.quantize_grouped(w, 32, 4, torch.float32)
        want, tol = qz.dequantize_grouped(q, s, z, 4), float(23 * s.abs().max() + z.abs().max()) / 2048 * 1.01
    else:
        q, s = qz.quantize_int8(w, torch.float32)
        want, tol = qz.dequantize_int8(q, s), float(q.abs().max() * s.max()) / 2048
    torch.testing.assert_close(layer.mlp.down_proj.reference_weight(), want, rtol=0, atol=tol)
    # Decode steps of both along the reference's greedy tokens: logits within the bound everywhere, and the same
    # choice wherever the reference's lead over its runner-up is wider than twice the bound (a near tie may flip).
    prompt = [5, 17, 33, 2]
    tokens = list(Generation(reference, prompt, SamplingParams(max_new_tokens=24)))
    steps = {}
    with torch.inference_mode():
        for name, model in (("ours", native), ("exact", reference)):
            session = KVSession(model, 64)
            session.prefill(prompt[:-1])
            steps[name] = torch.stack([session.step(t) for t in prompt[-1:] + tokens[:-1]])
    ours, exact = steps["ours"], steps["exact"]
    bound = 0.05 * float(exact.abs().max())
    assert float((ours - exact).abs().max()) < bound
    # Free-running greedy decoding of ours follows the reference until (if ever) a step where the reference's
    # lead over its runner-up is within twice the bound: only a near tie may flip.
    ours_tokens = list(Generation(native, prompt, SamplingParams(max_new_tokens=24)))
    split = next((i for i, (a, b) in enumerate(zip(ours_tokens, tokens)) if a != b), None)
    assert split is None or quant == "int8"  # int4: no near tie on the way here; int8 meets one at step 7
    if split is not None:
        top2 = exact[split].topk(2).values
        assert float(top2[0] - top2[1]) < 2 * bound, f"greedy tokens part at step {split} without a near tie"
