"""The whole decode step in one native call (csrc/decode.cpp) for a model whose every linear layer runs on
block matrices: per token one call instead of ~10 PyTorch operators per layer. The model's own KV cache
tensors are read and written in place, so prefill (PyTorch path) and decode share the cache."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ext
from .blocks import NativeLinear


def _parts(module: nn.Module, names: tuple[str, ...], fused: str) -> list | None:
    """The (blocks, type, perm) of q/k/v (or gate/up) in order, whether or not they were joined."""
    joined = getattr(module, fused, None)
    mods = [joined] if joined is not None else [getattr(module, n, None) for n in names]
    if not all(isinstance(m, NativeLinear) for m in mods):
        return None
    parts = [p for m in mods for p in m.parts()]
    return parts if len(parts) == len(names) else None


class FusedDecode:
    """Callable (tokens (B, 1), positions, rows) -> logits (B, 1, vocab) running `DecodePlan.step`."""

    def __init__(self, model: nn.Module, plan) -> None:
        self.model, self.plan = model, plan

    @classmethod
    def build(cls, model: nn.Module) -> "FusedDecode | None":
        """None unless the extension is built and every matrix (output included) is a block matrix."""
        module, cfg = ext(), model.config
        if module is None or not isinstance(model.lm_head, NativeLinear) or len(model.lm_head.parts()) != 1:
            return None
        norms, mats = [], []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _parts(attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
            gate_up = _parts(mlp, ("gate_proj", "up_proj"), "gate_up_proj")
            if qkv is None or gate_up is None or not isinstance(attn.o_proj, NativeLinear) \
                    or not isinstance(mlp.down_proj, NativeLinear):
                return None
            norms += [layer.input_layernorm.weight.detach().float().contiguous(),
                      layer.post_attention_layernorm.weight.detach().float().contiguous()]
            mats += qkv + attn.o_proj.parts() + gate_up + mlp.down_proj.parts()
        mats += model.lm_head.parts()
        blocks, types, perms = (list(x) for x in zip(*mats))
        plan = module.DecodePlan(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                                 cfg.norm_eps, norms, blocks, types, perms,
                                 model.model.norm.weight.detach().float().contiguous())
        return cls(model, plan)

    def __call__(self, tokens: Tensor, positions: Tensor, rows: Tensor | None) -> Tensor | None:
        model = self.model
        caches = [layer.self_attn.cache for layer in model.model.layers]
        if caches[0] is None or caches[0].k.dtype != torch.float32 or tokens.device.type != "cpu":
            return None  # not the case the native step serves: the PyTorch path runs
        b = tokens.shape[0]
        pos = positions.reshape(-1).to(torch.int64)
        if pos.numel() != b:
            pos = pos.expand(b)
        rows = torch.arange(b) if rows is None else rows.reshape(-1).to(torch.int64)
        cos, sin = model._rope(pos)
        x = model.model.embed_tokens(tokens[:, 0]).float()
        kv = [t for c in caches for t in (c.k, c.v)]
        return self.plan.step(x, pos.contiguous(), rows.contiguous(), cos, sin, kv)[:, None]


def attach(model: nn.Module) -> bool:
    """Give `model` the native decode step where it applies (Llama.forward uses it for one-token steps)."""
    step = FusedDecode.build(model)
    model.fused_step = step
    return step is not None
