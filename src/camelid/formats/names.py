"""Name tables and the rotary permutation: the only place that knows how formats name and lay out tensors.

The canonical in-memory form is Hugging Face's: `model.layers.{i}.self_attn.q_proj.weight` etc., with
rotate-half rotary layout for q and k rows. Meta, EasyLM and GGUF store q/k rows interleaved
(complex pairs); `to_interleaved` / `from_interleaved` convert, per head (k uses the kv-head count).
"""
from __future__ import annotations

import re

import torch

from ..errors import CamelidError

HF_LAYER = "model.layers.{i}."

# Per-layer names, native -> HF suffix (after "model.layers.{i}.").
GGUF_LAYER = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors some files carry that the model recomputes itself.
GGUF_IGNORED = {"rope_freqs.weight"}

_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_to_hf(name: str) -> str | None:
    """HF name of a GGUF tensor; None for tensors the model does not need."""
    if name in GGUF_IGNORED:
        return None
    if name in GGUF_GLOBAL:
        return GGUF_GLOBAL[name]
    m = _GGUF_BLOCK.fullmatch(name)
    if m and m.group(2) in GGUF_LAYER:
        return HF_LAYER.format(i=m.group(1)) + GGUF_LAYER[m.group(2)]
    raise CamelidError(f"unknown GGUF tensor name {name!r}: not a LLaMA-architecture tensor")


def hf_to_gguf(name: str) -> str:
    for native, hf in GGUF_GLOBAL.items():
        if hf == name:
            return native
    m = _HF_BLOCK.fullmatch(name)
    if m:
        for native, hf in GGUF_LAYER.items():
            if hf == m.group(2):
                return f"blk.{m.group(1)}.{native}"
    raise CamelidError(f"no GGUF name for tensor {name!r}")


# Meta's consolidated.NN.pth names, native -> HF suffix (after "model.layers.{i}.").
META_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
META_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
META_IGNORED = {"rope.freqs"}  # LLaMA-1 stores the rotary frequencies; the model recomputes them
_META_BLOCK = re.compile(r"layers\.(\d+)\.(.+)")
# Axis along which Meta's model-parallel shards split a tensor (None: replicated in every shard).
META_SHARD_AXIS = {"tok_embeddings": 1, "output": 0, "norm": None, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
                   "wo": 1, "w2": 1, "attention_norm": None, "ffn_norm": None}


def meta_to_hf(name: str) -> str | None:
    """HF name of a Meta tensor; None for tensors the model does not need."""
    if name in META_IGNORED:
        return None
    if name in META_GLOBAL:
        return META_GLOBAL[name]
    m = _META_BLOCK.fullmatch(name)
    if m and m.group(2) in META_LAYER:
        return HF_LAYER.format(i=m.group(1)) + META_LAYER[m.group(2)]
    raise CamelidError(f"unknown Meta tensor name {name!r}: not a LLaMA checkpoint tensor")


def hf_to_meta(name: str) -> str:
    for native, hf in META_GLOBAL.items():
        if hf == name:
            return native
    m = _HF_BLOCK.fullmatch(name)
    if m:
        for native, hf in META_LAYER.items():
            if hf == m.group(2):
                return f"layers.{m.group(1)}.{native}"
    raise CamelidError(f"no Meta name for tensor {name!r}")


def meta_shard_axis(name: str) -> int | None:
    """The concatenation axis of a Meta tensor across model-parallel shards (None: same in every shard)."""
    parts = name.split(".")
    key = parts[-2] if parts[-1] == "weight" and len(parts) >= 2 else parts[-1]
    if key not in META_SHARD_AXIS:
        raise CamelidError(f"unknown Meta tensor name {name!r}: cannot tell how its shards join")
    return META_SHARD_AXIS[key]


# EasyLM's flax parameter paths (key tuples joined with "/"), native -> HF suffix (after "model.layers.{i}.").
EASYLM_LAYER = {
    "attention/wq/kernel": "self_attn.q_proj.weight",
    "attention/wk/kernel": "self_attn.k_proj.weight",
    "attention/wv/kernel": "self_attn.v_proj.weight",
    "attention/wo/kernel": "self_attn.o_proj.weight",
    "feed_forward/w1/kernel": "mlp.gate_proj.weight",
    "feed_forward/w3/kernel": "mlp.up_proj.weight",
    "feed_forward/w2/kernel": "mlp.down_proj.weight",
    "attention_norm/kernel": "input_layernorm.weight",
    "ffn_norm/kernel": "post_attention_layernorm.weight",
}
EASYLM_GLOBAL = {
    "transformer/wte/embedding": "model.embed_tokens.weight",
    "transformer/ln_f/kernel": "model.norm.weight",
    "lm_head/kernel": "lm_head.weight",
}
# A whole train state (trainstate::) also holds the step counter and the optimizer state: not model weights.
EASYLM_IGNORED_ROOTS = ("step", "opt_state")
_EASYLM_BLOCK = re.compile(r"transformer/h/(\d+)/(.+)")


def easylm_to_hf(name: str) -> str | None:
    """HF name of an EasyLM parameter path; None for train-state entries the model does not need."""
    if name.split("/", 1)[0] in EASYLM_IGNORED_ROOTS:
        return None
    if name in EASYLM_GLOBAL:
        return EASYLM_GLOBAL[name]
    m = _EASYLM_BLOCK.fullmatch(name)
    if m and m.group(2) in EASYLM_LAYER:
        return HF_LAYER.format(i=m.group(1)) + EASYLM_LAYER[m.group(2)]
    raise CamelidError(f"unknown EasyLM parameter {name!r}: not a LLaMA checkpoint tensor")


def hf_to_easylm(name: str) -> str:
    for native, hf in EASYLM_GLOBAL.items():
        if hf == name:
            return native
    m = _HF_BLOCK.fullmatch(name)
    if m:
        for native, hf in EASYLM_LAYER.items():
            if hf == m.group(2):
                return f"transformer/h/{m.group(1)}/{native}"
    raise CamelidError(f"no EasyLM name for tensor {name!r}")


def easylm_transposed(name: str) -> bool:
    """EasyLM's dense kernels are stored in x out (flax Dense), the transpose of torch's out x in."""
    return name.endswith("/kernel") and not name.endswith("norm/kernel") and name != "transformer/ln_f/kernel"


def rotary_heads(hf_name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads a q/k projection's rows hold (the permutation works per head); None otherwise."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return n_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return n_kv_heads
    return None


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta/GGUF/EasyLM interleaved rows (per head: [x0..x_{d/2}, y..] -> [x0,y0,x1,y1..])."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta/GGUF/EasyLM interleaved rows -> HF rotate-half rows; inverse of `to_interleaved`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
