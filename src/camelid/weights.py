"""Filling a model built on the `meta` device with a checkpoint's tensors, through the format registry.

Every format is read the same way: `reader.tensors()` in its own names, `formats.to_canonical` to HF names and
layout. Readers that store tensors quantized (GGUF blocks, `camelid quantize` folders) also hand them out as
stored (`formats.stored_quantized`, `reader.stored`), so a quantized model never exists in float:
  * the plan (`plan_linears`) says, before any weight is read, which linear layers become which quantized module;
  * `assign_linears` fills those modules (stored codes as they are, GGUF blocks repacked, or float quantized now);
  * `float_state` reads the rest as float tensors for `load_state_dict(assign=True)`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from . import quantize as qz
from .kernels import quant as native_quant
from .config import ModelConfig
from .errors import CamelidError
from .formats import canonical_infos, layout_of, names, stored_quantized, to_canonical
from .formats.base import StoredTensor, TensorReader
from .quantize import Scheme

QUANTS = ("int8", "int4", "native")  # plus "none" (float) and "auto" (native for a quantized GGUF, else float)
GGUF_NATIVE = {"Q4_0", "Q4_1", "Q8_0"}  # GGUF types that load straight into the int4 kernel's layout
EMBED = "model.embed_tokens.weight"


class Weights:
    """A reader seen in HF names: hf name -> native name, and hf name -> stored quantized scheme."""

    def __init__(self, reader: TensorReader, config: ModelConfig):
        self.reader, self.config = reader, config
        self.fmt = getattr(reader, "format", "hf")
        self.infos = canonical_infos(reader)  # hf -> (native, info with the HF shape)
        to_hf = layout_of(self.fmt).to_hf
        # stored quantized tensors in HF names, a tied head's own stored copy included (tensors() hides it)
        self.stored = {hf: (native, scheme) for native, scheme in stored_quantized(reader).items()
                       if (hf := to_hf(native)) is not None}

    def scheme(self, hf: str) -> str | None:
        return self.stored[hf][1] if hf in self.stored else None

    def gguf_blocks(self) -> bool:
        """Does the checkpoint keep linear weights in blocks the int4 kernels (or the native ones) take as they are?"""
        return any(scheme in GGUF_NATIVE for _, scheme in self.stored.values())

    def read_float(self, hf: str) -> torch.Tensor:
        """One tensor in HF layout, dequantized if stored quantized."""
        native = self.infos[hf][0] if hf in self.infos else self.stored[hf][0]
        if (self.scheme(hf) or "").startswith("int"):  # `camelid quantize` codes (its reader's read() would say so)
            stored = self.reader.stored(native)
            return self.rotary(hf, qz.decode(stored.pieces.__getitem__, native, Scheme.parse(stored.scheme)))
        _, tensor = to_canonical(self.fmt, native, self.reader.read(native), self.config.num_heads,
                                 self.config.num_kv_heads)
        return tensor

    def read_stored(self, hf: str) -> StoredTensor:
        return self.reader.stored(self.stored[hf][0])

    def rotary(self, hf: str, tensor: torch.Tensor) -> torch.Tensor:
        """HF row order for a q/k tensor of an interleaved format (kept quantized, so `to_canonical` cannot)."""
        heads = names.rotary_heads(hf, self.config.num_heads, self.config.num_kv_heads)
        return names.from_interleaved(tensor, heads) if heads and layout_of(self.fmt).interleaved else tensor


def _stored_plan(weights: Weights, quant: str | None, linears: dict[str, nn.Linear]) -> dict[str, Scheme]:
    """The schemes a `camelid quantize` folder records for its layers (camelid.json; never guessed)."""
    plan = {}
    for hf, (_, scheme) in weights.stored.items():
        module = hf.removesuffix(".weight")
        if module in linears and scheme.startswith("int"):
            plan[module] = Scheme.parse(scheme)
    if plan and quant in ("int8", "int4") and all(s.method != quant for n, s in plan.items() if n != "lm_head"):
        raise CamelidError(f"{weights.reader.path}: the model is already quantized ({next(iter(plan.values())).describe()}); "
                           "load it without --quant (or --quant native)")
    return plan


def plan_linears(model: nn.Module, weights: Weights, quant: str | None, group: int | None) -> dict[str, Scheme]:
    """Which linear layers become which quantized module, decided before any weight is read."""
    linears = {n: model.get_submodule(n) for n in qz.linear_names(model)}
    stored = _stored_plan(weights, quant, linears)
    if stored or quant in (None, "none", "auto"):
        return stored
    if quant in ("int8", "int4"):
        # As llama.cpp's quantizer does, the output matrix keeps 8 bits in int4 mode: at 4 bits it costs the
        # most quality for its size (see the perplexities in tests/test_quantize.py).
        plan = {}
        for n, m in linears.items():
            method, g = ("int8", None) if n == "lm_head" and quant == "int4" else (quant, group)
            plan[n] = qz.scheme_for(method, (m.out_features, m.in_features), g)
        return plan
    plan = {}  # native: keep a GGUF's Q4_0 / Q4_1 / Q8_0 (int4 groups of 32; Q8_0 as two int4 planes); float has none
    for n in linears:
        kind = weights.scheme(n + ".weight") or (weights.scheme(EMBED) if n == "lm_head" else None)
        if kind in GGUF_NATIVE:
            plan[n] = Scheme("int8" if kind == "Q8_0" else "int4", 32)
    return plan


def _source_of(weights: Weights, target: str, tied_head: bool) -> str:
    """The HF tensor a planned layer is filled from: its own, or the embedding for a tied output matrix."""
    own = target + ".weight"
    return EMBED if tied_head and target == "lm_head" and own not in weights.stored else own


def _assign_one(module: nn.Module, weights: Weights, hf: str, scheme: Scheme, quant: str | None, device: Any,
                native_int: bool) -> nn.Module | None:
    """Fill one planned layer; returns the module to put in its place instead (the native kernels' blocks), or None."""
    kind = weights.scheme(hf) or ""
    if quant == "native" and kind in GGUF_NATIVE:  # GGUF blocks repacked for PyTorch's int4 kernel, q/k rows in HF order
        st = weights.read_stored(hf)
        q, scales, zeros, planes = qz.gguf_int4(st.data.numpy(), st.scheme, st.shape[0], st.shape[1])
        q, scales, zeros = (torch.cat([weights.rotary(hf, p) for p in t.chunk(planes)]) for t in (q, scales, zeros))
        module.assign(q.to(device), scales.to(device), zeros.to(device))
    elif kind.startswith("int"):  # stored by `camelid quantize`: its codes as they are
        st = weights.read_stored(hf)
        values = qz.module_values(st.pieces.__getitem__, weights.stored[hf][0], scheme)
        if native_int and (scheme.method == "int4" or not scheme.group):  # the same integers as blocks
            return native_quant.linear_from_int4(*values) if scheme.method == "int4" else \
                native_quant.linear_from_int8(*values)
        module.assign(*(t.to(device) for t in values))
    else:  # float weights (or blocks not kept) quantized now
        w = weights.read_float(hf)
        native = native_quant.linear_from_float(scheme, w) if native_int else None
        if native is not None:
            return native
        qz.assign_float(module, scheme, w.to(device))
    return None


def assign_linears(model: nn.Module, weights: Weights, plan: dict[str, Scheme], quant: str | None, device: Any,
                   native_int: bool, tick: Callable[[], None]) -> None:
    """Fill every planned (quantized) linear layer, one stored tensor at a time. `native_int`: int4 / int8 layers
    become the native kernels' block modules (kernels.quant) where they can."""
    tied_head = weights.config.tie_word_embeddings and "lm_head.weight" not in weights.infos
    for target, scheme in plan.items():
        hf = _source_of(weights, target, tied_head)
        native = _assign_one(model.get_submodule(target), weights, hf, scheme, quant, device, native_int)
        if native is not None:
            model.set_submodule(target, native)
        tick()


def check_tensors(model: nn.Module, weights: Weights) -> None:
    """Refuse, before reading any data, tensors the model does not have, wrong shapes and missing tensors."""
    expected = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    where = weights.reader.path
    for hf, (_, info) in weights.infos.items():
        if hf not in expected:
            raise CamelidError(f"{where}: unexpected tensor {hf!r}; it is not part of a LLaMA model")
        if tuple(info.shape) != expected[hf]:
            raise CamelidError(f"{where}: tensor {hf!r} has shape {tuple(info.shape)} but the config implies "
                               f"{expected[hf]}; the config does not match the weights")
    tied = weights.config.tie_word_embeddings
    missing = [n for n in expected if n not in weights.infos and not (tied and n == "lm_head.weight")]
    if missing:
        raise CamelidError(f"{where}: {len(missing)} tensors are missing, e.g. {missing[0]!r}; the checkpoint is incomplete")


def float_state(weights: Weights, skip: set[str], dtype: torch.dtype, device: Any,
                tick: Callable[[], None]) -> dict[str, torch.Tensor]:
    """HF name -> float tensor (in `dtype`, on `device`) of every tensor not filled otherwise."""
    state = {}
    for hf in weights.infos:
        if hf in skip:
            continue
        state[hf] = weights.read_float(hf).to(dtype).to(device)
        tick()
    return state
