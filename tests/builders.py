"""Tiny random LLaMA models written in the real formats, and the data the tests feed them.

Every test module builds its models from here (or through the fixtures in conftest.py), so one change to a
format's writer is made once. Nothing here is a test; no test module imports another."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from camelid.config import ModelConfig
from camelid.convert import expected_shapes
from camelid.formats import names
from camelid.model import Llama



# ---- reference models: transformers' LlamaForCausalLM with random weights, and ours from it --------------------------
CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "linear": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(num_key_value_heads=4, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama3": dict(num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
}


def reference(case: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    # max_position_embeddings 16 < the 24-token inputs, so dynamic NTK scaling actually kicks in.
    hf_config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, rms_norm_eps=1e-5,
                            rope_theta=10000.0, **CASES[case])
    ref = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # larger than the default init so differences in rope or norms show up in the logits
        for p in ref.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return ref


def ours_from(ref: LlamaForCausalLM) -> Llama:
    config = ModelConfig.from_hf_dict(ref.config.to_dict())
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True, strict=False)
    model.tie_weights()
    return model.eval()


IDS = torch.tensor([[1, 5, 17, 42, 99, 3, 250, 7, 64, 128]])


def tiny_hf(kv_heads: int, vocab: int = 256, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms, so a wrong norm mapping cannot hide behind all-ones weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.2) -> Llama:
    torch.manual_seed(seed)
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model


# ---- writers, one per real format ------------------------------------------------------------------------------------
def write_hf(folder: Path, config: ModelConfig, seed: int = 0, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A random model written straight as an HF folder (faster than building it in transformers)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in expected_shapes(config).items()}
    tensors.update(extra or {})
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return tensors


def kernel_sized_hf(folder: Path, tie: bool = False, seed: int = 3) -> dict[str, torch.Tensor]:
    """A tiny random LLaMA as an HF folder whose widths are multiples of 32 (the native kernels' blocks), std-0.2
    weights so logits spread and norms in 0.5-1.5; its tensors."""
    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=tie)
    g = torch.Generator().manual_seed(seed)
    state = {n: (torch.randn(p.shape, generator=g) * 0.2 if p.ndim > 1 else 0.5 + torch.rand(p.shape, generator=g))
             for n, p in Llama(config).state_dict().items() if not (tie and n == "lm_head.weight")}
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return state


def write_gguf(ref, path: Path, qtype=gguf.GGMLQuantizationType.F32, norm_type=gguf.GGMLQuantizationType.F32) -> Path:
    """A tiny LLaMA GGUF file the way llama.cpp's converter lays it out (q/k rows interleaved, no output when tied)."""
    c = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    for hf_name, tensor in ref.state_dict().items():
        t = tensor.float()
        heads = names.rotary_heads(hf_name, c.num_attention_heads, c.num_key_value_heads)
        if heads:
            t = names.to_interleaved(t, heads)
        arr = t.numpy()
        kind = norm_type if arr.ndim == 1 else qtype
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(names.hf_to_gguf(hf_name), arr)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(names.hf_to_gguf(hf_name), arr.astype(np.float16))
        else:
            w.add_tensor(names.hf_to_gguf(hf_name), gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_to_meta_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """Meta's layout from HF's, written independently of camelid: the inverse of Meta->HF
    `w.view(n, d1//n//2, 2, d2).transpose(1, 2)` (REFERENCE.md, transformers' converter)."""
    d1, d2 = w.shape
    return w.view(n, 2, d1 // n // 2, d2).transpose(1, 2).reshape(d1, d2)


def write_meta_shards(model: LlamaForCausalLM, folder: Path, shards: int) -> None:
    """A Meta checkpoint as Meta's code saves one: torch.save per model-parallel rank + params.json."""
    c = model.config
    sd = model.state_dict()
    full = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        full.update({
            f"layers.{i}.attention.wq.weight": hf_to_meta_rows(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": hf_to_meta_rows(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"]})
    axis = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
    folder.mkdir()
    for r in range(shards):
        part = {}
        for name, t in full.items():
            key = name.split(".")[-2]
            part[name] = t.chunk(shards, dim=axis[key])[r].clone() if key in axis else t.clone()
        torch.save(part, folder / f"consolidated.{r:02d}.pth")
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": -1, "multiple_of": 16, "norm_eps": c.rms_norm_eps}
    (folder / "params.json").write_text(json.dumps(params))


# ---- model folders with the LLaMA-2 tokenizer, for the CLI and the server --------------------------------------------
def llama2_sized_folder(folder: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer random LLaMA (17 MB of float32) with the LLaMA-2 tokenizer, as an HF folder."""
    write_hf(folder, ModelConfig.from_name("llama-2-7b").tiny(vocab_size=32000, max_position_embeddings=256))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / f, folder / f)
    return folder


def transformers_folder(folder: Path, tokenizer_dir: Path | None = None, seed: int = 0, std: float | None = None,
                        **config) -> Path:
    """A 2-layer random LLaMA saved by transformers itself (hidden 32 unless `config` says otherwise), with the
    tokenizer files of `tokenizer_dir` beside it. `std`: weights drawn N(0, std) and norms U(0.5, 1.5), larger than
    transformers' init, so that differences in rope or norms show in the logits."""
    settings = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    for f in (tokenizer_dir.glob("*.json") if tokenizer_dir else ()):
        shutil.copyfile(f, folder / f.name)
    return folder


# ---- conversation data for fine-tuning -------------------------------------------------------------------------------
WORDS = "the cat sat on a mat and looked at one dog which ran away quickly into the old garden".split()


def conversation(rng: random.Random, i: int) -> dict:
    q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": " ".join(sorted(q.split()))}]
    if i % 3 == 0:
        messages += [{"role": "user", "content": "again"}, {"role": "assistant", "content": q.upper()}]
    return {"id": f"t{i}", "source": "test", "messages": messages, "preferred": True}


def write_data(folder: Path, n_train: int = 48, n_eval: int = 8) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, base in (("train", n_train, 0), ("eval", n_eval, 1000)):
        lines = [json.dumps(conversation(rng, base + i)) for i in range(n)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"train": n_train, "eval": n_eval}))
    return folder
