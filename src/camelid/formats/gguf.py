"""GGUF (llama.cpp) files, read through the `gguf` package.

Tensors are returned in GGUF's native names and layout (q/k rows interleaved); quantized types are
dequantized with `gguf.quants`. Metadata becomes plain Python values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CamelidError
from .base import TensorInfo

try:
    import gguf
except ImportError as e:  # pragma: no cover - gguf is a hard dependency
    raise CamelidError("the 'gguf' package is missing: pip install gguf") from e

# The tensor types we can turn into floats; anything else gets a clear error naming the type.
SUPPORTED_TYPES = {
    gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
    gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
    gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K,
}


def _dequantize_simple(data: np.ndarray, qtype: "gguf.GGMLQuantizationType", rows: int, cols: int) -> torch.Tensor:
    """Q8_0 / Q4_0 / Q4_1 blocks of 32 -> fp32, vectorised in torch (several times faster than gguf.quants).

    Q8_0: f16 scale + 32 int8. Q4_0: f16 scale + 16 bytes, value (q - 8) * d. Q4_1: f16 scale, f16 min,
    16 bytes, value q * d + m. In a 4-bit block the low nibbles are elements 0-15, the high ones 16-31.
    """
    raw = torch.from_numpy(np.array(data, copy=True).reshape(-1))  # a writable copy of the mapped bytes
    T = gguf.GGMLQuantizationType
    block = {T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20}[qtype]
    blocks = raw.view(rows * cols // 32, block)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    if qtype == T.Q8_0:
        values = blocks[:, 2:].contiguous().view(torch.int8).float() * d
    else:
        start = 2 if qtype == T.Q4_0 else 4
        packed = blocks[:, start:]
        q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()
        if qtype == T.Q4_0:
            values = (q - 8) * d
        else:
            values = q * d + blocks[:, 2:4].contiguous().view(torch.float16).float()
    return values.reshape(rows, cols)


def _field_value(field: Any) -> Any:
    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    if types[0] == gguf.GGUFValueType.BOOL:
        return bool(value)
    return value


class GGUFReader:
    """Lazy reader of one GGUF file (memory-mapped; a tensor is read only when asked for)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CamelidError(f"{self.path}: no such file")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the gguf package raises ValueError/IndexError/... on damaged files
            raise CamelidError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                               "the file may be truncated or corrupt, download it again") from None
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = _field_value(field)
        self._tensors = {t.name: t for t in self._reader.tensors}

    def tensors(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
                for name, t in self._tensors.items()}

    def raw(self, name: str) -> tuple[np.ndarray, "gguf.GGMLQuantizationType", tuple[int, ...]]:
        """The stored bytes/values of a tensor, its type and its (rows, cols) shape; no conversion."""
        t = self._tensors[name]
        return t.data, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist()))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        data, qtype, shape = self.raw(name)
        if qtype not in SUPPORTED_TYPES:
            raise CamelidError(f"{self.path}: tensor {name!r} has GGUF type {qtype.name}, which camelid cannot read "
                               f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
        if qtype == gguf.GGMLQuantizationType.F32:
            tensor = torch.from_numpy(np.array(data, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            tensor = torch.from_numpy(np.array(data, dtype=np.float16))
        elif qtype == gguf.GGMLQuantizationType.BF16:
            tensor = torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16)
        elif qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
            cols = shape[-1]
            tensor = _dequantize_simple(data, qtype, int(np.prod(shape)) // cols, cols)
        else:
            try:
                tensor = torch.from_numpy(gguf.quants.dequantize(data, qtype))
            except Exception as e:
                raise CamelidError(f"{self.path}: tensor {name!r} ({qtype.name}) could not be decoded: {e}") from None
        tensor = tensor.reshape(shape)
        return tensor.to(dtype) if dtype is not None else tensor

    def close(self) -> None:
        self._tensors.clear()
        self._reader = None
