"""GGUF K-quant output (formats/kquants.py): blocks that gguf-py's decoder reads as our values, llama.cpp's
type mixes for q4_k_m / q5_k_m / q6_k, and llama.cpp itself running the file with our logits."""
from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from camelid.convert import convert
from camelid.engine import load_model
from camelid.formats import kquants
from camelid.formats.gguf import GGUFReader

Q = gguf.GGMLQuantizationType
# (type, sub-block size, levels): the error of a value is at most about one step of its sub-block
# (Q6_K is symmetric: its step is max |x| / 31; levels None)
BLOCKS = [(Q.Q4_K, 32, 15), (Q.Q5_K, 32, 31), (Q.Q6_K, 16, None)]


def rows(n: int = 48, cols: int = 512) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n, cols)) * 0.02).astype(np.float32)
    x[1, :256] = np.abs(x[1, :256]) + 0.01  # sub-blocks with no negative value (the format's min is >= 0)
    x[2] = 0.0
    x[3, 7] = 0.5  # one outlier: its sub-block gets a large scale, the others keep theirs
    return x


@pytest.mark.parametrize("qtype,sub,levels", BLOCKS)
def test_blocks_decode_with_gguf_to_within_a_step(qtype, sub: int, levels: int | None) -> None:
    x = rows()
    blocks = kquants.quantize(x, qtype)
    assert blocks.shape == (x.shape[0], x.shape[1] // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    y = gguf.quants.dequantize(blocks, qtype)
    assert y.shape == x.shape
    groups = x.reshape(x.shape[0], -1, sub)
    step = (np.abs(groups).max(axis=2) / 31 if levels is None else
            (groups.max(axis=2) - np.minimum(groups.min(axis=2), 0)) / levels)  # per sub-block
    err = np.abs(y - x).reshape(groups.shape)
    assert (err <= step[..., None] * 1.01 + 1e-7).all(), float((err - step[..., None]).max())
    assert np.array_equal(y[2], x[2])  # zeros stay exactly zero
    # quality in the family's range: Q4_K about Q4_1's error, Q5_K and Q6_K below Q5_0's
    rmse = float(np.sqrt(((y - x) ** 2).mean()))
    q41 = gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q4_1), Q.Q4_1)
    q50 = gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q5_0), Q.Q5_0)
    bound = {Q.Q4_K: 1.15 * np.sqrt(((q41 - x) ** 2).mean()), Q.Q5_K: np.sqrt(((q50 - x) ** 2).mean())}
    assert rmse < bound.get(qtype, 0.6 * np.sqrt(((q50 - x) ** 2).mean())), rmse


def test_mixes_follow_llama_cpp() -> None:
    mix = kquants.mix_type
    more = [i for i in range(32) if kquants.use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert mix("q4_k_m", "output.weight", 4096, 32, True) == Q.Q6_K
    assert mix("q4_k_m", "token_embd.weight", 4096, 32, True) == Q.Q4_K
    assert mix("q4_k_m", "token_embd.weight", 4096, 32, False) == Q.Q6_K  # tied: the embedding is the output
    assert mix("q4_k_m", "blk.0.attn_v.weight", 4096, 32, True) == Q.Q6_K
    assert mix("q4_k_m", "blk.4.attn_v.weight", 4096, 32, True) == Q.Q4_K
    assert mix("q4_k_m", "blk.6.ffn_down.weight", 11008, 32, True) == Q.Q6_K
    assert mix("q4_k_m", "blk.5.attn_q.weight", 4096, 32, True) == Q.Q4_K
    assert mix("q5_k_m", "blk.5.ffn_down.weight", 11008, 32, True) == Q.Q5_K
    assert mix("q6_k", "blk.6.attn_q.weight", 4096, 32, True) == Q.Q6_K
    # rows that do not split into 256-blocks: llama.cpp's fallbacks
    assert mix("q4_k_m", "blk.6.attn_q.weight", 576, 30, True) == Q.Q5_0
    assert mix("q5_k_m", "blk.6.attn_q.weight", 576, 30, True) == Q.Q5_1
    assert mix("q6_k", "blk.6.attn_q.weight", 576, 30, True) == Q.Q8_0
    assert mix("q4_k_m", "output.weight", 576, 30, True) == Q.Q8_0
    assert mix("q4_k_m", "blk.0.attn_q.weight", 48, 30, True) == Q.F16


@pytest.fixture(scope="module")
def kquant_model(tmp_path_factory, llama2_tokenizer_dir: Path):
    """A tiny LLaMA whose rows split into 256-blocks, with the LLaMA-2 tokenizer, as an HF folder."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("kq") / "hf"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama2_tokenizer_dir / f, folder / f)
    return folder


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k"])
def test_kquant_file_types_and_values(kquant_model: Path, tmp_path: Path, mix: str) -> None:
    out = tmp_path / f"m-{mix}.gguf"
    convert(str(kquant_model), out, "gguf", quant=mix, progress=False)
    reader = GGUFReader(out)
    types = {n: i.dtype for n, i in reader.tensors().items()}
    base = kquants.MIXES[mix].name
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == base
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == ("Q6_K")  # use_more_bits(1, 2)
    assert types["blk.0.ffn_down.weight"] == base
    assert reader.metadata["general.file_type"] == int(kquants.FILE_TYPES[mix])
    # camelid reads back what gguf-py decodes, and within the block error of the source
    w = reader.read("blk.0.ffn_up.weight")
    data, qtype, _ = reader.raw("blk.0.ffn_up.weight")
    assert torch.equal(w, torch.from_numpy(gguf.quants.dequantize(np.asarray(data), qtype)))
    src = dict(LlamaForCausalLM.from_pretrained(kquant_model).named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert (w - src.detach()).abs().max() < 0.1 * src.abs().max()  # half a 4-bit step at most


def test_llama_cpp_runs_the_file_with_our_logits(kquant_model: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "m.gguf"
    convert(str(kquant_model), out, "gguf", quant="q4_k_m", progress=False)
    tokens = [1, 450, 7483, 310, 3444, 338, 3681, 29889, 13, 1576, 4996, 17354, 1701]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    theirs = torch.tensor(np.array(llm.scores[:len(tokens)]), dtype=torch.float32)
    loaded = load_model(out)  # the same blocks, dequantized to float32
    with torch.no_grad():
        ours = loaded.model(torch.tensor([tokens]))[0].float()
    # llama.cpp rounds activations to 8 bits in its quantized products: close, not equal
    rel = ((theirs - ours).norm() / ours.norm()).item()
    assert rel < 0.03, rel
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.75  # a random model has near ties


@pytest.mark.parametrize("mix,ftype", [("q4_k_m", 15), ("q5_k_m", 17), ("q6_k", 18)])
def test_same_types_as_llama_cpp_quantizer_and_comparable_error(kquant_model: Path, tmp_path: Path, mix: str,
                                                                ftype: int) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) on the same float32 file: the same type for every
    tensor, and our error per tensor within 1.3x of its (it searches scales; we take min/max once)."""
    import ctypes
    llama_cpp = pytest.importorskip("llama_cpp")
    convert(str(kquant_model), tmp_path / "f32.gguf", "gguf", dtype="float32", progress=False)
    convert(str(kquant_model), tmp_path / "ours.gguf", "gguf", quant=mix, progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(tmp_path / "theirs.gguf").encode(),
                                          ctypes.byref(params)) == 0
    floats, ours, theirs = (GGUFReader(tmp_path / f) for f in ("f32.gguf", "ours.gguf", "theirs.gguf"))
    assert {n: i.dtype for n, i in ours.tensors().items()} == {n: i.dtype for n, i in theirs.tensors().items()}
    for name, info in ours.tensors().items():
        if info.dtype in ("Q4_K", "Q5_K", "Q6_K"):
            w = floats.read(name)
            mine, peer = ((r.read(name) - w).pow(2).mean().sqrt().item() for r in (ours, theirs))
            assert mine <= 1.3 * peer, (name, info.dtype, mine, peer)
