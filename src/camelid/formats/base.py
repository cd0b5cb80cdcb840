"""The one small interface every checkpoint format implements.

A reader lists tensors (name -> shape, dtype) in the format's *own* names and layout and reads one
tensor at a time, lazily; nothing is loaded until asked. A writer takes tensors as a stream.
Mapping native names/layouts to the canonical Hugging Face form is `names.py`'s job, not the
format's, so every permutation lives in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import CamelidError


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # the stored type: "F32", "F16", "BF16", "Q8_0", "Q4_1", "int8", ...


class TensorReader(Protocol):
    path: Path
    metadata: dict[str, Any]  # format-specific key/values (GGUF fields, params.json, config.json ...)

    def tensors(self) -> dict[str, TensorInfo]:
        """Native tensor names -> stored shape and type, in file order."""
        ...

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor in the format's native layout, dequantized if stored quantized, cast if `dtype`."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in the quantized form its file stores, handed to modules that compute on that form, so a
    quantized model never exists in float."""
    scheme: str  # GGUF blocks "Q4_0" / "Q4_1" / "Q8_0" ...; or a `camelid quantize` scheme "int8", "int8 g128", "int4 g32"
    shape: tuple[int, ...]  # the float tensor's shape, native layout
    data: torch.Tensor  # GGUF: uint8, one row of blocks per tensor row (a view of the mapped file); camelid: the codes
    pieces: dict[str, torch.Tensor] = field(default_factory=dict)  # camelid: X.weight, X.scales, X.zeros by name


@runtime_checkable
class StoredQuantReader(Protocol):
    """What a reader adds when it can hand out tensors as stored quantized (GGUF, `camelid quantize` folders):
    the loader keeps them quantized; `read` still dequantizes them (convert and every float user)."""

    def quantized(self) -> dict[str, str]:
        """Native names of the tensors stored quantized -> their scheme (`StoredTensor.scheme`)."""
        ...

    def stored(self, name: str) -> StoredTensor:
        """One of `quantized()`'s tensors as stored, without conversion."""
        ...


class TensorWriter(Protocol):
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (native name and layout of this format)."""
        ...

    def finish(self) -> None:
        """Complete the output (indexes, metadata) and move it from its temporary name into place."""
        ...

    def abort(self) -> None:
        """Remove everything written so far."""
        ...


def ensure_finite(name: str, tensor: torch.Tensor, hint: str = "") -> None:
    """Refuse to write a float tensor holding NaN or inf (an overflow in a cast or a sum, or a wrong input):
    a model that silently generates nothing is worse than one clear error. Integer tensors pass."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CamelidError(f"tensor {name!r} would be written with {bad} non-finite values (NaN or inf)"
                           f"{hint}; nothing was written")

