"""camelid's own `--quant int4` / `--quant int8` of a float model, run by the native kernels: each layer is
quantized as the PyTorch path does it (quantize.py) and handed over as blocks, so a float HF model with
`--quant int4` decodes through the same repacked kernels as a Q4_1 GGUF.

int4 (w = (q - 8) s + z per group of 32/64/128) becomes Q4_1 blocks (d = s, m = z - 8 s) and int8 per output
channel becomes Q8_0 blocks (d = the row's scale): the same integers, with d and m rounded to float16 as
GGUF stores them (|dw| <= (15 |s| + |z| + 8 |s|) / 2048 per weight) and activations rounded to int8 per 32
(llama.cpp's Q8 activations) where the PyTorch kernels use bfloat16 ones. Grouped int8 (two int4 planes in
PyTorch's kernel) has no block form here and keeps the PyTorch path."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import quantize as qz
from . import ext
from .blocks import NO_PERM, TYPES, NativeLinear, from_int4, from_int8, load_layout


def applies(device: str | torch.device, dtype: torch.dtype, act_dtype: torch.dtype | None) -> bool:
    """Whether int4/int8 layers run on the native kernels: CPU, a float32 model, no act_dtype asked (asking for
    one means the PyTorch kernels' arithmetic), the extension built."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and act_dtype is None and ext() is not None


def linear_from_float(scheme: qz.Scheme, w: Tensor) -> NativeLinear | None:
    """The block module for float weight w (out, in) under `scheme`, or None (grouped int8, odd widths)."""
    if w.shape[1] % 32:
        return None
    if scheme.method == "int4":
        return linear_from_int4(*qz.quantize_grouped(w.float(), scheme.group, 4, torch.float32))
    if scheme.method == "int8" and not scheme.group:
        return linear_from_int8(*qz.quantize_int8(w.float(), torch.float32))
    return None


def linear_from_int4(q: Tensor, scales: Tensor, zeros: Tensor) -> NativeLinear:
    """int4 values 0..15 (out, in) with scales/zeros per group -> repacked Q4_1 blocks."""
    return NativeLinear([(*load_layout(from_int4(q, scales, zeros), TYPES["Q4_1"]), NO_PERM)])


def linear_from_int8(q: Tensor, scales: Tensor) -> NativeLinear:
    """int8 per output channel -> repacked Q8_0 blocks."""
    return NativeLinear([(*load_layout(from_int8(q, scales), TYPES["Q8_0"]), NO_PERM)])
