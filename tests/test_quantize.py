"""Weight-only quantization: kernels against a dequantize-then-matmul reference, GGUF Q4_0/Q4_1/Q8_0 blocks
repacked exactly, `camelid quantize` folders, perplexity of int8/int4 against float32, `camelid bench`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import pytest
import torch
import torch.nn.functional as F

from camelid import quantize as qz
from camelid.cli import main
from camelid.engine import builtin_model_path, load_model
from .builders import reference, write_gguf

# A fixed English text for perplexity (not chat formatted: plain continuation).
TEXT = ("The camel is an even-toed ungulate in the genus Camelus that bears distinctive fatty deposits known as "
        "humps on its back. Camels have long been domesticated and, as livestock, they provide food and textiles. "
        "They are working animals especially suited to their desert habitat and are a vital means of transport for "
        "passengers and cargo. There are three surviving species of camel. The one-humped dromedary makes up 94% of "
        "the world's camel population, and the two-humped Bactrian camel makes up 6%.")


@pytest.mark.parametrize("method,group", [("int8", 0), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_quantized_linear_equals_dequantized_matmul(method: str, group: int, act: torch.dtype) -> None:
    torch.manual_seed(0)
    n, k = 40, 256  # 40 rows: not a multiple of 16, so the int4 module pads
    w = torch.randn(n, k) * 0.05
    scheme = qz.Scheme(method, group)
    module = qz.make_module(scheme, k, n, act).to_empty(device="cpu")
    qz.assign_float(module, scheme, w)
    if method == "int8" and not group:
        q, s = qz.quantize_int8(w, act)
        deq = qz.dequantize_int8(q, s)
        step = s.float()[:, None]
    elif method == "int8":  # per group, run as two int4 planes
        q, s, z = qz.quantize_grouped(w, group, 8, act)
        deq = qz.dequantize_grouped(q, s, z, 8)
        # bf16 scales and zeros shift the 255-step grid by up to half a step: one step at most in all
        step = s.float().repeat_interleave(group, 1) * (2 if act == torch.bfloat16 else 1)
        assert isinstance(module, qz.Int4Linear) and module.planes == 2
    else:
        q, s, z = qz.quantize_grouped(w, group, 4, act)
        deq = qz.dequantize_grouped(q, s, z, 4)
        assert q.min() >= 0 and q.max() <= 15
        step = s.float().repeat_interleave(group, 1)
    # The quantization itself is close to the float weight: at most half a step per element (plus the
    # rounding of the scale to the kernel's dtype).
    assert ((deq - w).abs() <= step * 0.51 + 1e-6).all()
    for shape in ((1, 1, k), (2, 7, k)):
        x = torch.randn(shape)
        y = module(x)
        assert y.shape == (*shape[:-1], n) and y.dtype == x.dtype
        expected = x.double() @ deq.double().T
        tol = 1e-4 if act == torch.float32 else 3e-2  # bf16 activations: 8 bits of mantissa
        err = (y.double() - expected).abs().max().item() / expected.abs().max().item()
        assert err < tol, f"{method} g{group} {act} {shape}: relative error {err}"


def test_int4_rejects_bad_group_and_falls_back_to_int8() -> None:
    assert qz.scheme_for("int4", (64, 576), 128) == qz.Scheme("int4", 64)  # 576 = 4.5 * 128
    assert qz.scheme_for("int4", (64, 176), 32) == qz.Scheme("int8")  # no int4 kernel for widths % 32
    assert qz.scheme_for("int8", (64, 256)) == qz.Scheme("int8", 0)  # per output channel
    assert qz.scheme_for("int8", (64, 256), 64).planes == 2  # per group: two int4 planes
    with pytest.raises(Exception, match="group"):
        qz.scheme_for("int4", (64, 256), 48)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_repacked_give_dequantized_logits(tmp_path: Path, qtype: str) -> None:
    ref = reference("gqa")
    path = write_gguf(ref, tmp_path / f"tiny-{qtype}.gguf", gguf.GGMLQuantizationType[qtype])
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    with torch.no_grad():
        dequantized = load_model(path).model(tokens)
        native = load_model(path, quant="native", act_dtype=torch.float32)
        kinds = {type(m).__name__ for m in native.model.modules() if isinstance(m, (qz.Int4Linear, torch.nn.Linear))}
        assert kinds == {"Int4Linear"}, kinds  # every linear layer, the 101-row output included, kept its blocks
        planes = {m.planes for m in native.model.modules() if isinstance(m, qz.Int4Linear)}
        assert planes == ({2} if qtype == "Q8_0" else {1})
        diff = (native.model(tokens) - dequantized).abs().max().item()
        assert diff < 1e-3, f"{qtype}: max |logit diff| {diff}"
        fast = load_model(path, quant="native")  # bf16 activations: close, not exact
        assert (fast.model(tokens) - dequantized).abs().max().item() < 0.05 * dequantized.abs().max().item()


@pytest.mark.parametrize("qtype,quant,group", [("F32", None, None), ("F32", "int8", None), ("F32", "int8", 32),
                                               ("F32", "int4", 32), ("Q8_0", "native", None), ("Q4_1", "native", None)])
def test_fused_projections_give_the_same_logits(tmp_path: Path, qtype: str, quant: str | None, group: int | None) -> None:
    """q/k/v and gate/up fused into one matrix each compute exactly what the separate layers compute, for every
    module kind (float, int8, int4, two-plane int4 from Q8_0). The tiny model's 32-row k/v and 160-row gate/up
    are not whole 64-row blocks, so the values are read back through the kernel (`Int4Linear.unpacked`)."""
    path = write_gguf(reference("gqa"), tmp_path / f"tiny-{qtype}.gguf", gguf.GGMLQuantizationType[qtype])
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    plain, fused = (load_model(path, quant=quant, group=group).model for _ in range(2))
    assert qz.fuse_projections(fused) == 2
    attn = fused.model.layers[0].self_attn
    assert attn.qkv_proj.out_features == 64 + 2 * 32 and not hasattr(attn, "q_proj")
    assert fused.model.layers[0].mlp.gate_up_proj.out_features == 2 * 160
    with torch.no_grad():
        assert torch.equal(plain(tokens), fused(tokens))


def test_fused_projections_of_the_builtin_model_decode_the_same_tokens() -> None:
    """The built-in model's layers are whole 64-row blocks: PyTorch's packed int4 weights (an act_dtype asks for
    those modules) are joined as they are."""
    plain = load_model(quant="int4", act_dtype=torch.bfloat16).model
    fused = load_model(quant="int4", act_dtype=torch.bfloat16).model
    assert qz.fuse_projections(fused) == fused.config.num_layers
    layer = fused.model.layers[3]
    assert torch.equal(layer.mlp.gate_up_proj.unpacked()[0][:1536], plain.model.layers[3].mlp.gate_proj.unpacked()[0])
    tokens = torch.arange(1, 30)[None]
    with torch.no_grad():
        assert torch.equal(plain(tokens), fused(tokens))


def test_int4_and_int8_of_the_builtin_gguf_run_on_the_block_kernels() -> None:
    """`--quant int4/int8` of the built-in Q4_1 GGUF: its layers, dequantized and quantized anew, become the block
    kernels' modules (repacked Q4_1 / Q8_0) and decode in one native call per token, as a float model's do."""
    from camelid import kernels
    from camelid.kernels import blocks as kb
    if kernels.ext() is None:
        pytest.skip("native kernels not built here")
    for quant, qtype in (("int4", kb.TYPES["Q4_1"] + kb.PACKED), ("int8", kb.TYPES["Q8_0"])):
        model = load_model(quant=quant, fuse=True).model
        assert model.fused_step is not None
        assert model.model.layers[0].self_attn.qkv_proj.types == [qtype] * 3
        assert model.lm_head.types == [kb.TYPES["Q8_0"]]  # int4 keeps the output matrix at int8


@pytest.fixture(scope="module")
def builtin_models():
    models = {q: load_model(quant=q) for q in (None, "int8", "int4", "native")}
    models["int8 g32"] = load_model(quant="int8", group=32)
    return models


def _perplexity(model: torch.nn.Module, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1].float()
    return math.exp(F.cross_entropy(logits, torch.tensor(ids[1:])).item())


def test_perplexity_int8_int4_against_float32(builtin_models) -> None:
    tok = builtin_models[None].tokenizer
    ids = tok.encode(TEXT)
    ppl = {str(q): _perplexity(m.model, ids) for q, m in builtin_models.items()}
    print(f"\nperplexity on {len(ids)} tokens (SmolLM2-135M Q4_1 file): "
          + ", ".join(f"{q if q != 'None' else 'float32'} {p:.3f}" for q, p in ppl.items()))
    base = ppl["None"]
    assert 1 < base < 100  # the model reads English
    # This model's weights are Q4_1 blocks: int4 and int8 with a min/max per group of 32 find the same grid
    # again (only bf16 scales differ), while symmetric int8 per output channel rounds each row on a step set by
    # its largest weight (~1% weight error here: +4% perplexity on this small model and short text).
    # int8 per channel runs on the block kernels, which round the activations to int8 per 32 too (llama.cpp's
    # arithmetic): +6.3% here, +3.9% with PyTorch's bf16 activations. Grouped int8 keeps PyTorch's kernel.
    assert abs(ppl["int8 g32"] / base - 1) < 0.01
    assert abs(ppl["int8"] / base - 1) < 0.07
    assert abs(ppl["int4"] / base - 1) < 0.03
    assert abs(ppl["native"] / base - 1) < 0.01  # the file's own blocks: only bf16 activations differ


def test_quantize_command_folder_loads_and_generates(builtin_models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "smollm2-int4"
    assert main(["quantize", str(builtin_model_path()), str(out), "--quant", "int4", "--embedding", "float32",
                 "--quiet"]) == 0
    info = json.loads((out / "camelid.json").read_text())
    assert info["quant"] == "int4" and info["group"] == 32 and info["layers"]["lm_head"] == "int8"
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    # 4-bit layers with bf16 scales and zeros (66 MB) + the int8 output matrix (28 MB) + the float32 embedding
    # (113 MB): 207 MB, against 540 MB in float32
    assert size < 215e6
    # On PyTorch's int modules (bf16 activations, which an act_dtype asks for): the same quantization code as
    # quantizing on load, so the same logits.
    loaded = load_model(out, act_dtype=torch.bfloat16)
    assert set(loaded.quant.values()) == {"int4 g32", "int8"}
    tokens = torch.tensor([loaded.tokenizer.encode(TEXT)[:24]])
    with torch.no_grad():
        reference = load_model(quant="int4", act_dtype=torch.bfloat16).model(tokens)
        assert torch.equal(loaded.model(tokens), reference)
        native = load_model(out).model(tokens)
        on_load = builtin_models["int4"].model(tokens)
        exact = builtin_models[None].model(tokens)
    # By default the stored integers run on the native block kernels (int8 activations), as quantizing on load
    # does (from float32 scales there, bfloat16 ones in the folder): both as near the float model as PyTorch's
    # int4 modules are (3-5% of the largest logit here).
    for logits in (native, on_load, reference):
        drift = (logits - exact).abs().max() / exact.abs().max()
        assert drift < 0.06, drift
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--max-new-tokens", "8", "--device", "cpu", "The capital of France is"]) == 0
    assert len(capsys.readouterr().out.strip()) > 3
    with pytest.raises(Exception, match="already quantized"):
        load_model(out, quant="int8")


@pytest.mark.parametrize("args", [["--quant", "int4", "--group", "64", "--quantize-embeddings"],
                                  ["--quant", "int4", "--embedding", "int4"],
                                  ["--quant", "int8", "--group", "32"], ["--quant", "int8"]])
def test_quantized_folder_equals_transformers_on_its_dequantized_weights(tmp_path: Path, args: list[str]) -> None:
    """The stored layout, read back by hand as documented (nibbles low first, w = (q - 8) * scale + zero;
    int8 w = q * scale per row or group), into transformers' model: camelid's logits on the folder match."""
    from safetensors.torch import load_file
    ref = reference("gqa")
    ref.save_pretrained(tmp_path / "hf")
    assert main(["quantize", str(tmp_path / "hf"), str(tmp_path / "q"), *args, "--quiet"]) == 0
    stored = load_file(tmp_path / "q" / "model.safetensors")
    state = {}
    for name, t in stored.items():
        base = name.removesuffix(".weight")
        if name.endswith((".scales", ".zeros")):
            continue
        if base + ".zeros" in stored and t.shape[1] == ref.state_dict()[name].shape[1]:  # int8 per group
            state[name] = qz.dequantize_grouped(t, stored[base + ".scales"], stored[base + ".zeros"], 8)
        elif base + ".zeros" in stored:
            state[name] = qz.dequantize_grouped(qz.unpack_nibbles(t), stored[base + ".scales"], stored[base + ".zeros"], 4)
        elif base + ".scales" in stored or (name.endswith("embed_tokens.weight") and "model.embed_tokens.scales" in stored):
            scales = stored[(base if base + ".scales" in stored else "model.embed_tokens") + ".scales"].float()
            state[name] = (t.float().reshape(t.shape[0], scales.shape[-1] if scales.ndim == 2 else 1, -1)
                           * scales.reshape(t.shape[0], -1, 1)).reshape(t.shape)
        else:
            state[name] = t
    assert json.loads((tmp_path / "q" / "camelid.json").read_text())["quant"] == args[1]
    want = torch.int8 if "--quantize-embeddings" in args else torch.uint8 if "--embedding" in args else torch.float32
    assert stored["model.embed_tokens.weight"].dtype == want
    ref.load_state_dict(state)
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    loaded = load_model(tmp_path / "q", act_dtype=torch.float32)
    with torch.no_grad():
        diff = (loaded.model(tokens) - ref(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_bench_prints_its_table(capsys) -> None:
    assert main(["bench", "--quant", "int4", "--new-tokens", "8", "--prompt-tokens", "16", "--rounds", "1",
                 "--chart", ""]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "| engine |" in out and "| camelid | int4 |" in out
    row = next(line for line in out.splitlines() if line.startswith("| camelid"))
    decode = float(row.split("|")[4])
    assert decode > 0
