"""Name tables and the rotary permutation: the only place that knows how formats name and lay out tensors.

The canonical in-memory form is Hugging Face's: `model.layers.{i}.self_attn.q_proj.weight` etc., with
rotate-half rotary layout for q and k rows. Meta, EasyLM and GGUF store q/k rows interleaved
(complex pairs); `to_interleaved` / `from_interleaved` convert, per head (k uses the kv-head count).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import CamelidError

HF_LAYER = "model.layers.{i}."
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class NameTable:
    """How one format names the tensors of a LLaMA model: whole-model names, per-layer names under a numbered
    prefix, and names the model does not need (recomputed, or optimizer state). Both ways, HF canonical."""
    what: str  # how an error names one of the format's tensors: "GGUF tensor name"
    block: str  # the per-layer prefix, "blk.{i}."
    layer: dict[str, str]  # native suffix (after the prefix) -> HF suffix (after "model.layers.{i}.")
    whole: dict[str, str]  # native -> HF name of the tensors outside the layers
    ignored: frozenset[str] = frozenset()  # names the model does not need
    ignored_roots: tuple[str, ...] = ()  # first path parts ("/"-separated) the model does not need
    unknown: str = "not a LLaMA checkpoint tensor"  # the error's second half

    @cached_property
    def _pattern(self) -> re.Pattern:
        head, tail = self.block.split("{i}")
        return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "(.+)")

    @cached_property
    def _inverse(self) -> tuple[dict[str, str], dict[str, str]]:
        return {hf: n for n, hf in self.whole.items()}, {hf: n for n, hf in self.layer.items()}

    def to_hf(self, name: str) -> str | None:
        """HF name of a native tensor; None for tensors the model does not need."""
        if name in self.ignored or name.split("/", 1)[0] in self.ignored_roots:
            return None
        if name in self.whole:
            return self.whole[name]
        m = self._pattern.fullmatch(name)
        if m and m.group(2) in self.layer:
            return HF_LAYER.format(i=m.group(1)) + self.layer[m.group(2)]
        raise CamelidError(f"unknown {self.what} {name!r}: {self.unknown}")

    def from_hf(self, name: str) -> str:
        """Native name of an HF tensor."""
        whole, layer = self._inverse
        if name in whole:
            return whole[name]
        m = _HF_BLOCK.fullmatch(name)
        suffix = layer.get(m.group(2)) if m else None
        if suffix is None:
            raise CamelidError(f"no {self.what.split()[0]} name for tensor {name!r}")
        return self.block.format(i=m.group(1)) + suffix


GGUF = NameTable("GGUF tensor name", "blk.{i}.", unknown="not a LLaMA-architecture tensor", layer={
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}, whole={
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}, ignored=frozenset({"rope_freqs.weight"}))  # some files carry the rotary factors the model recomputes

# Meta's consolidated.NN.pth names.
META = NameTable("Meta tensor name", "layers.{i}.", layer={
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}, whole={
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}, ignored=frozenset({"rope.freqs"}))  # LLaMA-1 stores the rotary frequencies; the model recomputes them

# EasyLM's flax parameter paths (key tuples joined with "/"). A whole train state (trainstate::) also holds
# the step counter and the optimizer state: not model weights.
EASYLM = NameTable("EasyLM parameter", "transformer/h/{i}/", layer={
    "attention/wq/kernel": "self_attn.q_proj.weight",
    "attention/wk/kernel": "self_attn.k_proj.weight",
    "attention/wv/kernel": "self_attn.v_proj.weight",
    "attention/wo/kernel": "self_attn.o_proj.weight",
    "feed_forward/w1/kernel": "mlp.gate_proj.weight",
    "feed_forward/w3/kernel": "mlp.up_proj.weight",
    "feed_forward/w2/kernel": "mlp.down_proj.weight",
    "attention_norm/kernel": "input_layernorm.weight",
    "ffn_norm/kernel": "post_attention_layernorm.weight",
}, whole={
    "transformer/wte/embedding": "model.embed_tokens.weight",
    "transformer/ln_f/kernel": "model.norm.weight",
    "lm_head/kernel": "lm_head.weight",
}, ignored_roots=("step", "opt_state"))

gguf_to_hf, hf_to_gguf = GGUF.to_hf, GGUF.from_hf
meta_to_hf, hf_to_meta = META.to_hf, META.from_hf
easylm_to_hf, hf_to_easylm = EASYLM.to_hf, EASYLM.from_hf

# Axis along which Meta's model-parallel shards split a tensor (None: replicated in every shard).
META_SHARD_AXIS = {"tok_embeddings": 1, "output": 0, "norm": None, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
                   "wo": 1, "w2": 1, "attention_norm": None, "ffn_norm": None}


def meta_shard_axis(name: str) -> int | None:
    """The concatenation axis of a Meta tensor across model-parallel shards (None: same in every shard)."""
    parts = name.split(".")
    key = parts[-2] if parts[-1] == "weight" and len(parts) >= 2 else parts[-1]
    if key not in META_SHARD_AXIS:
        raise CamelidError(f"unknown Meta tensor name {name!r}: cannot tell how its shards join")
    return META_SHARD_AXIS[key]


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
