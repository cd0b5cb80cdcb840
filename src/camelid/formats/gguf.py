"""GGUF (llama.cpp) files: the header parsed here (fast), constants and k-quant decoding from `gguf`.

Tensors are returned in GGUF's native names and layout (q/k rows interleaved); quantized types are
dequantized with `gguf.quants`. Metadata becomes plain Python values.
"""
from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CamelidError
from .base import StoredTensor, TensorInfo

try:
    import gguf
except ImportError as e:  # pragma: no cover - gguf is a hard dependency
    raise CamelidError("the 'gguf' package is missing: pip install gguf") from e

# The tensor types we can turn into floats; anything else gets a clear error naming the type.
SUPPORTED_TYPES = {
    gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
    gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
    gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K,
    gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q5_1,  # llama.cpp's K-quant fallbacks
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


_FLOAT_NAMES = {"F32", "F16", "BF16", "F64"}

# GGUF value types -> (struct format, size) for scalars; 8 = string, 9 = array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class _Header:
    """GGUF v2/v3 header parsed straight from the bytes: key/values and tensor infos, nothing else.

    The `gguf` package builds a numpy memmap view for every part of every field, which costs ~2.5 s on the
    built-in model's 49152-entry vocabulary; this reads strings with one slice each and number arrays
    with one `np.frombuffer` (~50 ms)."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("bad magic (not a GGUF file)")
        self.pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar(4))
        self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []  # name, GGUF dims, type, offset
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._scalar(10) for _ in range(self._scalar(4)))
            self.tensors.append((name, dims, self._scalar(4), self._scalar(10)))
        align = int(self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        self.data_start = -(-self.pos // align) * align

    def _scalar(self, kind: int) -> Any:
        fmt, size = _SCALARS[kind]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def _string(self) -> str:
        n = self._scalar(10)
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def _value(self, kind: int) -> Any:
        if kind == 8:
            return self._string()
        if kind != 9:
            return self._scalar(kind)
        item, count = self._scalar(4), self._scalar(10)
        if item in _NUMPY:
            dtype = np.dtype(_NUMPY[item])
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values.tolist()
        if item == 8:  # string arrays (vocabularies, merges): the hot loop, kept free of method calls
            buf, pos, out = self.buf, self.pos, []
            length = struct.Struct("<Q").unpack_from
            for _ in range(count):
                (n,) = length(buf, pos)
                out.append(str(buf[pos + 8:pos + 8 + n], "utf-8", "replace"))
                pos += 8 + n
            if pos > len(buf):
                raise ValueError("string array runs past the end of the file")
            self.pos = pos
            return out
        return [self._value(item) for _ in range(count)]


class GGUFReader:
    """Lazy reader of one GGUF file (memory-mapped; a tensor is read only when asked for)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CamelidError(f"{self.path}: no such file")
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            header = _Header(memoryview(self._map))
            self._tensors: dict[str, tuple[Any, tuple[int, ...], int]] = {}
            for name, dims, kind, offset in header.tensors:
                qtype = gguf.GGMLQuantizationType(kind)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                shape = tuple(int(d) for d in reversed(dims))  # GGUF lists the fastest-varying dim first
                rows, cols = int(np.prod(shape[:-1])) if len(shape) > 1 else 1, shape[-1]
                if cols % block:
                    raise ValueError(f"tensor {name!r}: {cols} columns is not a multiple of the {qtype.name} block")
                start = header.data_start + offset
                nbytes = rows * cols // block * type_size
                if start + nbytes > len(self._map):
                    raise ValueError(f"tensor {name!r} runs past the end of the file")
                self._tensors[name] = (qtype, shape, start, nbytes)
        except (ValueError, struct.error, IndexError, KeyError, OverflowError, MemoryError) as e:
            raise CamelidError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                               "the file may be truncated or corrupt, download it again") from None
        self.metadata: dict[str, Any] = header.fields

    def tensors(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(shape, qtype.name) for name, (qtype, shape, _, _) in self._tensors.items()}

    def raw(self, name: str) -> tuple[np.ndarray, "gguf.GGMLQuantizationType", tuple[int, ...]]:
        """The stored values (float types: an array of the tensor's shape) or blocks (quantized: uint8, one
        row of bytes per tensor row) of a tensor, memory-mapped, with its type and shape; no conversion."""
        qtype, shape, start, nbytes = self._tensors[name]
        data = self._map[start:start + nbytes]
        floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                  gguf.GGMLQuantizationType.BF16: np.uint16, gguf.GGMLQuantizationType.F64: np.float64}
        if qtype in floats:
            return data.view(floats[qtype]).reshape(shape), qtype, shape
        return data.reshape(*shape[:-1], -1) if len(shape) > 1 else data, qtype, shape

    def quantized(self) -> dict[str, str]:
        """Tensors stored in blocks (Q8_0, Q4_K ...) -> their type; float tensors are left out."""
        return {name: qtype.name for name, (qtype, _, _, _) in self._tensors.items() if qtype.name not in _FLOAT_NAMES}

    def stored(self, name: str) -> StoredTensor:
        """A quantized tensor's blocks as a uint8 (rows, row bytes) view of the mapped file: no copy."""
        data, qtype, shape = self.raw(name)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        with warnings.catch_warnings():  # a read-only map: nothing writes to the blocks
            warnings.simplefilter("ignore")
            blocks = torch.from_numpy(data.reshape(rows, -1))
        return StoredTensor(qtype.name, shape, blocks)

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
        self._map = None


def tokenizer_of(path: str | Path):
    """The tokenizer a GGUF file's header holds (tokenizer.ggml.*); no tensor is read."""
    from ..tokenizer import Tokenizer
    return Tokenizer.from_gguf_metadata(GGUFReader(Path(path)).metadata)
