"""Weight-only quantization: int8 per output channel and int4 group-wise (groups of 32/64/128).

Four parts, the first three as in gpt-fast:
  * tensors: `quantize_int8` (symmetric, per channel) and `quantize_grouped` (min/max per group, 8 or 4 bits)
    turn a float weight into integers + scales (+ zeros); `gguf_int4` repacks GGUF Q4_0 / Q4_1 / Q8_0 blocks
    into the int4 layout exactly, no float detour;
  * the stored layout of a `camelid quantize` folder, both ways (`stored_pieces`, `encode`, `decode`,
    `module_values`), decoded by the schemes its camelid.json records (read and checked in formats/quantized.py);
  * modules: `Int8Linear` and `Int4Linear` run PyTorch's CPU kernels (`_weight_int8pack_mm`,
    `_weight_int4pack_mm_for_cpu`), measured fastest in benchmarks/linear_kernels.py;
  * the swap: `swap_linears` replaces `nn.Linear`s of a model built on the `meta` device, so the float
    weights of a quantized model are never materialised; `assign` then fills each module.

int4 values follow the kernel's convention: w = (q - 8) * scale + zero, q in 0..15. Then GGUF maps exactly:
Q4_0 (w = d * (q - 8)) is scale d, zero 0; Q4_1 (w = d * q + m) is scale d, zero m + 8d. Grouped int8
(w = (q - 128) * s + z, q = 16 * hi + lo) becomes two int4 planes stacked along the rows, hi with scale 16s
and zero 0, lo with scale s and zero 8s + z, whose outputs the module adds: exact, so Q8_0 (s = d, z = 0,
q = q8 + 128) loads without loss, and `--quant int8 --group N` runs the same way. Plain int8 is symmetric
per output channel (`_weight_int8pack_mm`).

The kernels' fp32-activation paths are slow (benchmarks/linear_kernels.py: ~1.5 GB/s against ~40 for
bf16), so a float32 model runs its quantized layers with bf16 activations by default (`act_dtype`), as
llama.cpp rounds activations to 8 bits in its quantized kernels; pass act_dtype=float32 for exact math.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CamelidError

GROUPS = (32, 64, 128)  # what --group may say (the int4 kernel also takes 256)
METHODS = ("int8", "int4")
BITS = {"int8": 8, "int4": 4}
_MIN_SCALE = {8: 1e-8, 4: 1e-6}  # each bit width keeps its floor: stored folders stay the same byte for byte


@dataclass(frozen=True)
class Scheme:
    """How one linear layer is stored: "int8" per output channel (group 0) or per group of `group` inputs,
    or "int4" per group. Grouped int8 runs as two int4 planes (planes=2) in the int4 kernel, exactly."""
    method: str
    group: int = 0  # 0: int8 per output channel
    planes: int = 1

    def __post_init__(self) -> None:
        if self.method == "int8" and self.group:
            object.__setattr__(self, "planes", 2)

    def describe(self) -> str:
        if self.method == "int8":
            return f"int8 g{self.group}" if self.group else "int8"
        return f"int4 g{self.group}" + (" x2" if self.planes > 1 else "")

    @classmethod
    def parse(cls, text: str) -> "Scheme":
        """The inverse of `describe` for what a folder stores ("int8", "int8 g128", "int4 g32"); ValueError else."""
        parts = text.split()
        if len(parts) == 1 and parts[0] == "int8":
            return cls("int8")
        if len(parts) == 2 and parts[0] in METHODS and parts[1].startswith("g") and int(parts[1][1:]) > 0:
            return cls(parts[0], int(parts[1][1:]))
        raise ValueError(text)


def scheme_for(method: str, shape: tuple[int, int], group: int | None = None) -> Scheme:
    """The scheme a weight of `shape` (out, in) gets. int4: groups of `group` (default 32), the largest of
    32/64/128 up to it that divides the input width; int8: per output channel, or per group when `group`
    is given. Widths with no such group (not a multiple of 32) fall back to int8 per channel."""
    if method not in METHODS:
        raise CamelidError(f"unknown quantization {method!r} (use int8 or int4)")
    if group is not None and group not in GROUPS:
        raise CamelidError(f"--group {group}: use one of {', '.join(map(str, GROUPS))}")
    if method == "int4" or group:
        for g in (128, 64, 32):
            if g <= (group or 32) and shape[1] % g == 0:
                return Scheme(method, g)
    return Scheme("int8", 0)


# ---- tensors ------------------------------------------------------------------------------------------
def quantize_int8(w: Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: (q int8 (out, in), scales (out,) in `dtype`), w ~= q * scales[:, None].
    Scales are rounded to `dtype` first, as for int4."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype).float()
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(dtype)


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales.float()[:, None]


def quantize_grouped(w: Tensor, group: int, bits: int, dtype: torch.dtype = torch.bfloat16
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max quantization per group of `group` inputs to `bits` (4 or 8): (q uint8 0..2^bits-1,
    one per byte (out, in); scales, zeros (out, in/group)), w = (q - 2^(bits-1)) * scale + zero. At 8 bits a
    grid already on 4 (Q4_1 weights) is kept exactly.

    Scales and zeros are rounded to `dtype` (what is stored and what the kernel reads) before the values
    are chosen, so the values are the best ones for the scales actually used."""
    n, k = w.shape
    if k % group:
        raise CamelidError(f"int{bits} group {group} does not divide the input width {k}")
    top, mid = 2 ** bits - 1, 2 ** (bits - 1)
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scales = ((hi - lo) / top).clamp(min=_MIN_SCALE[bits]).to(dtype).float()
    zeros = (lo + mid * scales).to(dtype).float()
    q = torch.round((g - (zeros - mid * scales)[..., None]) / scales[..., None]).clamp(0, top).to(torch.uint8)
    return q.reshape(n, k), scales.to(dtype), zeros.to(dtype)


def dequantize_grouped(q: Tensor, scales: Tensor, zeros: Tensor, bits: int) -> Tensor:
    """w = (q - 2^(bits-1)) * scale + zero per group, q one value per byte (int4: unpacked)."""
    n, k = q.shape
    g = (q.float().reshape(n, scales.shape[1], -1) - 2 ** (bits - 1)) * scales.float()[..., None]
    return (g + zeros.float()[..., None]).reshape(n, k)


def int8_planes(q: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped int8 (w = (q - 128) * s + z, q uint8) as two int4 planes stacked along the rows, exactly:
    q = 16 * hi + lo; plane 1 = hi with scale 16s, zero 0; plane 2 = lo with scale s, zero 8s + z."""
    s = scales.float()
    return (torch.cat([q >> 4, q & 0x0F]), torch.cat([16 * s, s]),
            torch.cat([torch.zeros_like(s), 8 * s + zeros.float()]))


def pack_nibbles(q: Tensor) -> Tensor:
    """(out, in) values 0..15 -> (out, in/2) bytes, the even column in the low nibble (the stored layout)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: Tensor) -> Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def gguf_int4(data: np.ndarray, qtype: str, rows: int, cols: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """GGUF Q4_0 / Q4_1 / Q8_0 blocks -> int4 group-32 (q (planes*rows, cols), scales, zeros, planes), exactly.

    Q4 blocks: f16 d (Q4_1: then f16 m), 16 bytes; low nibbles are elements 0-15, high ones 16-31.
    Q8_0 blocks: f16 d, 32 int8; returned as two planes stacked along the rows (see the module docstring)."""
    block = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
    raw = torch.from_numpy(np.array(data, copy=True).reshape(-1).view(np.uint8))  # writable copy of the mapped bytes
    blocks = raw.view(rows, cols // 32, block)
    d = blocks[..., :2].contiguous().view(torch.float16).float().squeeze(-1)
    if qtype == "Q8_0":  # w = d * q8 = d * ((q8 + 128) - 128): zero 0
        q8 = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, cols)
        return (*int8_planes((q8.to(torch.int16) + 128).to(torch.uint8), d, torch.zeros_like(d)), 2)
    packed = blocks[..., 2:] if qtype == "Q4_0" else blocks[..., 4:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(rows, cols)
    if qtype == "Q4_0":
        return q, d, torch.zeros_like(d), 1
    m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    return q, d, m + 8 * d, 1


# ---- the stored layout (a `camelid quantize` folder), both ways ----------------------------------------
# X.weight int8 (out, in)                      + X.scales (out,)                    int8 per output channel
# X.weight uint8 (out, in)                     + X.scales, X.zeros (out, in/group)  int8 per group
# X.weight uint8 (out, in/2), low nibble first + X.scales, X.zeros (out, in/group)  int4
# Scales and zeros in bf16 (what the kernels read). camelid.json records every tensor's scheme: the reader
# (formats/quantized.py) decodes by it and checks the stored shapes against it, never guessing from shapes.


def stored_pieces(hf: str, scheme: Scheme | None, shape: tuple[int, ...]) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of what the canonical tensor `hf` of `shape` is stored as (None: float32)."""
    n, k = shape[0], shape[-1]
    if scheme is None:
        return [(hf, tuple(shape), torch.float32)]
    base = hf.removesuffix(".weight")
    if scheme.method == "int8" and not scheme.group:
        return [(hf, tuple(shape), torch.int8), (base + ".scales", (n,), torch.bfloat16)]
    width = k // 2 if scheme.method == "int4" else k
    return [(hf, (n, width), torch.uint8), (base + ".scales", (n, k // scheme.group), torch.bfloat16),
            (base + ".zeros", (n, k // scheme.group), torch.bfloat16)]


def encode(tensor: Tensor, scheme: Scheme | None) -> list[Tensor]:
    """The stored pieces of a float tensor, in `stored_pieces` order."""
    if scheme is None:
        return [tensor.float().contiguous()]
    if scheme.method == "int8" and not scheme.group:
        return list(quantize_int8(tensor))
    q, scales, zeros = quantize_grouped(tensor, scheme.group, BITS[scheme.method])
    return [pack_nibbles(q) if scheme.method == "int4" else q, scales, zeros]


def module_values(read: Callable[[str], Tensor], hf: str, scheme: Scheme) -> tuple[Tensor, ...]:
    """What the module `make_module(scheme)` takes in `assign`, from the stored pieces (`read(name)`), exactly."""
    base = hf.removesuffix(".weight")
    q, scales = read(hf), read(base + ".scales")
    if scheme.method == "int8" and not scheme.group:
        return q, scales
    zeros = read(base + ".zeros")
    return (unpack_nibbles(q), scales, zeros) if scheme.method == "int4" else int8_planes(q, scales, zeros)


def decode(read: Callable[[str], Tensor], hf: str, scheme: Scheme) -> Tensor:
    """The float32 tensor `hf` stored per `scheme` (its pieces read with `read(name)`)."""
    base = hf.removesuffix(".weight")
    q, scales = read(hf), read(base + ".scales")
    if scheme.method == "int8" and not scheme.group:
        return dequantize_int8(q, scales)
    q = unpack_nibbles(q) if scheme.method == "int4" else q
    return dequantize_grouped(q, scales, read(base + ".zeros"), BITS[scheme.method])


# ---- modules ------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """y = x @ (q * scales).T with int8 q per output channel; torch._weight_int8pack_mm on CPU."""

    def __init__(self, in_features: int, out_features: int, act_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.act_dtype = in_features, out_features, act_dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=act_dtype, device=device))

    def assign(self, q: Tensor, scales: Tensor) -> None:
        self.weight = q.to(torch.int8).contiguous()
        self.scales = scales.to(self.act_dtype).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)
        if self.weight.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        else:  # no packed kernel here: dequantize (correct anywhere, not fast)
            y = F.linear(x2, self.weight.to(self.act_dtype)) * self.scales
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8, act={self.act_dtype}"


class Int4Linear(nn.Module):
    """y = x @ w.T with w = (q - 8) * scale + zero per group of inputs; torch._weight_int4pack_mm_for_cpu.

    The kernel needs a multiple of 16 output rows: other sizes are padded with zero rows and sliced off.
    With planes=2 the rows hold two planes whose outputs add up (an exact Q8_0)."""

    def __init__(self, in_features: int, out_features: int, group: int = 32, planes: int = 1,
                 act_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if in_features % group:
            raise CamelidError(f"int4 group {group} does not divide the input width {in_features}")
        self.in_features, self.out_features, self.group, self.planes = in_features, out_features, group, planes
        self.act_dtype = act_dtype
        self.rows = -(-out_features * planes // 16) * 16
        self.register_buffer("weight", torch.empty(self.rows, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group, self.rows, 2, dtype=act_dtype,
                                                             device=device))

    def assign(self, q: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """q: values 0..15 (planes*out, in) (uint8, one per byte); scales, zeros: (planes*out, in/group)."""
        pad = self.rows - q.shape[0]
        if pad:
            q = torch.cat([q, torch.full((pad, q.shape[1]), 8, dtype=q.dtype, device=q.device)])
            scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
        if q.device.type == "cpu":
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        else:
            self.weight = pack_nibbles(q.to(torch.uint8))
        self.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(self.act_dtype).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)
        if self.weight.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group, self.scales_and_zeros)
        else:
            sz = self.scales_and_zeros.transpose(0, 1)
            w = dequantize_grouped(unpack_nibbles(self.weight), sz[..., 0], sz[..., 1], 4).to(self.act_dtype)
            y = F.linear(x2, w)
        n = self.out_features
        y = y[:, :n] if self.planes == 1 else y[:, :n] + y[:, n:2 * n]
        return y.reshape(*lead, n).to(x.dtype)

    def unpacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """What `assign` took, padding rows dropped: (q values 0..15 (planes*out, in), scales, zeros).

        The CPU kernel's packed layout is PyTorch's own; the values are read back through the kernel itself,
        multiplying the identity with unit scales and zero offsets: q - 8 comes out exactly (small integers)."""
        rows = self.out_features * self.planes
        sz = self.scales_and_zeros.transpose(0, 1)[:rows]
        if self.weight.device.type == "cpu":
            unit = torch.zeros_like(self.scales_and_zeros)
            unit[..., 0] = 1
            eye = torch.eye(self.in_features, dtype=unit.dtype)
            q = torch._weight_int4pack_mm_for_cpu(eye, self.weight, self.group, unit).t()[:rows] + 8
        else:
            q = unpack_nibbles(self.weight)[:rows]
        return q.to(torch.uint8), sz[..., 0], sz[..., 1]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int4 group {self.group}"
                f"{', 2 planes' if self.planes > 1 else ''}, act={self.act_dtype}")


def make_module(scheme: Scheme, in_features: int, out_features: int, act_dtype: torch.dtype) -> nn.Module:
    if scheme.method == "int8" and not scheme.group:
        return Int8Linear(in_features, out_features, act_dtype, device="meta")
    return Int4Linear(in_features, out_features, scheme.group, scheme.planes, act_dtype, device="meta")


def swap_linears(model: nn.Module, plan: dict[str, Scheme], act_dtype: torch.dtype) -> None:
    """Replace the nn.Linear named `prefix` in `plan` ("model.layers.0.mlp.up_proj") by its quantized module.

    Done on the meta device, before any weight exists; a tied lm_head stops sharing the embedding."""
    for name, scheme in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise CamelidError(f"{name} is not a linear layer; it cannot be quantized")
        setattr(parent, child, make_module(scheme, old.in_features, old.out_features, act_dtype))


def assign_float(module: nn.Module, scheme: Scheme, w: Tensor) -> None:
    """Quantize the float weight `w` (out, in) into `module` (built by make_module for `scheme`)."""
    if scheme.method == "int8" and not scheme.group:
        module.assign(*quantize_int8(w, module.act_dtype))
    elif scheme.method == "int8":
        module.assign(*int8_planes(*quantize_grouped(w, scheme.group, 8, module.act_dtype)))
    else:
        module.assign(*quantize_grouped(w, scheme.group, 4, module.act_dtype))


def concat_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One module whose output is the outputs of `parts` side by side (same input, same kind of module), or
    None when the parts differ in kind (a GGUF may store q, k and v in different types)."""
    first, out = parts[0], sum(p.out_features for p in parts)
    if all(hasattr(p, "parts") for p in parts):  # native block matrices side by side: no copy
        return type(parts[0])([part for p in parts for part in p.parts()])
    if all(type(p) is nn.Linear and p.bias is None for p in parts):
        fused = nn.Linear(first.in_features, out, bias=False, device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        return fused
    if all(type(p) is Int8Linear and p.act_dtype == first.act_dtype for p in parts):
        fused = Int8Linear(first.in_features, out, first.act_dtype, device="meta")
        fused.assign(torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts]))
        return fused
    if all(type(p) is Int4Linear and (p.group, p.planes, p.act_dtype) == (first.group, first.planes, first.act_dtype)
           for p in parts):
        fused = Int4Linear(first.in_features, out, first.group, first.planes, first.act_dtype, device="meta")
        spans = [(p, plane * p.out_features, (plane + 1) * p.out_features) for plane in range(first.planes) for p in parts]
        if all(p.weight.device.type == "cpu" and p.out_features % 64 == 0 for p in parts) and _packed_rows_concatenate():
            fused.weight = torch.cat([p.weight[a:b] for p, a, b in spans])
            fused.scales_and_zeros = torch.cat([p.scales_and_zeros[:, a:b] for p, a, b in spans], dim=1)
            return fused
        values = [p.unpacked() for p in parts]
        # Each part's rows are its planes one after the other; the fused rows keep the planes outermost.
        fused.assign(*(torch.cat([v[i].chunk(first.planes)[plane] for plane in range(first.planes) for v in values])
                       for i in range(3)))
        return fused
    return None


@functools.cache
def _packed_rows_concatenate() -> bool:
    """Whether the CPU int4 kernel's packed weights of 64-row blocks concatenate like the rows themselves
    (the kernel packs rows in blocks of 64 or 32 on x86; checked once, else `unpacked` reads the values back)."""
    def pack(q: Tensor) -> Tensor:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0))
    return torch.equal(torch.cat([pack(q[:64]), pack(q[64:])]), pack(q))


def fuse_projections(model: nn.Module) -> int:
    """For inference: q/k/v and gate/up of every block become one matrix each, so decoding runs 4 matrix
    products per block instead of 7 (fewer kernel launches, better use of the threads). The parameters then no
    longer carry Hugging Face names: not for a model that is trained or saved. Returns the blocks fused."""
    fused_blocks = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = concat_linears([mlp.gate_proj, mlp.up_proj])
        if qkv is not None:
            attn.qkv_proj = qkv
            del attn.q_proj, attn.k_proj, attn.v_proj
        if gate_up is not None:
            mlp.gate_up_proj = gate_up
            del mlp.gate_proj, mlp.up_proj
        fused_blocks += qkv is not None and gate_up is not None
    return fused_blocks


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]

