"""A float model (bfloat16 or float32 weights) on the native decode step: its matrices become NativeLinear over
their own storage (no copy: the weight's bytes, read as rows of BF16 / F32 "blocks"), so a token is one native
call (csrc/decode.cpp) at every width, as for a quantized GGUF.

bfloat16 weights: products round the activations to bfloat16 with float sums (vdpbf16ps, as llama.cpp's BF16
path); the rest of the step (norms, rotary, attention, residuals, the KV cache) runs in float32, so a bfloat16
model computes more exactly than in the PyTorch path, where every activation is bfloat16. The embedding stays
bfloat16 (rows widened as they are looked up) and a tied output reads it. float32 weights: float32 throughout.
Prefill-sized products go to oneDNN (bf16) or PyTorch (f32) through the same modules (blocks.NativeLinear)."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import FLOAT_TYPES, NO_PERM, NativeEmbedding, NativeLinear

_MATRICES = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every matrix a decode step multiplies by, the output matrix last."""
    found = []
    for layer in model.model.layers:
        for part, names in _MATRICES:
            parent = getattr(layer, part)
            found += [(parent, n, getattr(parent, n, None)) for n in names]
    found.append((model, "lm_head", model.lm_head))
    return found


def swap_in_float(model: nn.Module) -> bool:
    """Move a float model's matrices onto the native kernels in place (before quantize.fuse_projections, which
    then joins them without a copy); False (nothing changed) where the model does not fit them: another dtype, a
    bias, a width not a multiple of 32, or a layer that is not nn.Linear."""
    embed = model.model.embed_tokens
    dtype = embed.weight.dtype
    layers = _linears(model)
    if dtype not in FLOAT_TYPES or not isinstance(embed, nn.Embedding) or embed.weight.shape[1] % 32:
        return False
    if not all(isinstance(lin, nn.Linear) and lin.bias is None and lin.weight.dtype == dtype
               and lin.in_features % 32 == 0 for _, _, lin in layers):
        return False
    qtype = FLOAT_TYPES[dtype]
    tied = model.lm_head.weight is embed.weight
    weights = [lin.weight for _, _, lin in layers if not (tied and lin is model.lm_head)]
    if dtype != torch.float32:
        weights.append(embed.weight)
    place = _arena([w.numel() * w.element_size() for w in weights])
    moved = {id(w): place(w) for w in weights}
    for parent, name, lin in layers:
        if not (tied and lin is model.lm_head):
            setattr(parent, name, NativeLinear([(moved[id(lin.weight)], qtype, NO_PERM)]))
    if dtype != torch.float32:
        # The embedding keeps its bfloat16 rows (the tied output reads the same tensor); everything else that is
        # float (norms) becomes float32, the width the step computes in, and so does the KV cache.
        table = moved[id(embed.weight)]
        model.model.embed_tokens = NativeEmbedding(table, qtype)
        if tied:
            model.lm_head = NativeLinear([(table, qtype, NO_PERM)])
        model.float()
    elif tied:
        model.lm_head = NativeLinear([(embed.weight.detach().view(torch.uint8), qtype, NO_PERM)])
    return True


HUGE = 2 << 20
TRIM_EVERY = 64 << 20  # malloc_trim walks the whole heap: once per 64 MB moved, not per tensor


def _arena(sizes: list[int]):
    """A function moving each weight (in `sizes` order) into one buffer backed by 2 MB pages where the kernel
    gives them: decode streams every weight once per token, and on 4 KB pages the hardware prefetcher stops at
    every page edge (a 49152 x 576 bf16 matrix read at 33 vs 25 GB/s on one thread; the built-in model's decode
    +8% bf16, +10% f32, alternating runs). The copy replaces the original tensor by tensor, so the weights are
    held about once (peak RSS unchanged)."""
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += (n + 63) // 64 * 64
    buffer = torch.empty(total + HUGE, dtype=torch.uint8)
    start = (-buffer.data_ptr()) % HUGE
    _advise_huge(buffer.data_ptr() + start, total)
    it = iter(offsets)
    freed = [0]

    def place(w: torch.Tensor) -> torch.Tensor:
        rows = w.detach().contiguous().view(torch.uint8)
        at = start + next(it)
        out = buffer[at:at + rows.numel()].view(rows.shape)
        out.copy_(rows)
        w.data = torch.empty(0, dtype=w.dtype)  # the original's memory is freed at once
        freed[0] += rows.numel()
        if freed[0] >= TRIM_EVERY:  # and given back to the system (a heap keeps it): held about once
            _libc_call("malloc_trim", 0)
            freed[0] = 0
        return out
    return place


def _advise_huge(address: int, length: int) -> None:
    """madvise(MADV_HUGEPAGE) over untouched memory."""
    import ctypes
    _libc_call("madvise", ctypes.c_void_p(address), ctypes.c_size_t(length), 14)  # 14: MADV_HUGEPAGE


def _libc_call(name: str, *args) -> None:
    """A C library call where the platform has it (Linux, glibc); nothing elsewhere."""
    import ctypes
    import ctypes.util
    try:
        getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)(*args)
    except (OSError, AttributeError, TypeError):
        pass
