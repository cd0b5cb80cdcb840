"""A `camelid quantize` folder read as float weights, so it can be converted or re-quantized.

The folder stores each quantized linear layer as integers + scales (+ zeros), per the scheme camelid.json
records under "layers" ("int8", "int8 g128", "int4 g32"); the embedding may be stored the same way ("embedding";
older folders: "quantized_embeddings", int8 rows). The layout itself (both ways) lives in camelid.quantize,
beside the math. This reader shows the model's own tensor names and float32 shapes and dequantizes on read, by
the schemes the folder records, checked against the stored shapes (never guessed from them). The quantization
error stays: the notice says so, and how to get full precision back (start from the float source).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import CamelidError
from . import manifest
from .base import TensorInfo
from .hf import HFReader


def quantize_record(folder: Path) -> dict[str, Any] | None:
    """camelid.json of a `camelid quantize` folder (it records "layers"); None for any other folder."""
    info = manifest.read(folder)
    return info if info is not None and info.get("layers") is not None else None


class QuantizedFolderReader:
    """HF names and float32 tensors of a `camelid quantize` folder, dequantized one tensor at a time."""

    def __init__(self, folder: str | Path, record: dict[str, Any], **_options: Any):
        from .. import quantize as qz  # the layout's own code (the folder is camelid's, not a peer format)
        self._qz = qz
        self._raw = HFReader(folder)
        self.path, self.metadata = self._raw.path, self._raw.metadata
        raw = self._raw.tensors()
        schemes = qz.recorded_schemes(record, self.path)
        qz.check_stored({n: tuple(i.shape) for n, i in raw.items()}, schemes, self.path)
        self._schemes = {module + ".weight": s for module, s in schemes.items()}
        tied = bool(self.metadata.get("tie_word_embeddings", False))
        missing = [n for n in self._schemes if n not in raw and not (tied and n.startswith("lm_head."))]
        if missing:
            raise CamelidError(f"{self.path}: camelid.json names a quantized layer {missing[0]!r} the weights lack")
        self._info: dict[str, TensorInfo] = {}
        for name, info in raw.items():
            if name.endswith((".scales", ".zeros")) or (tied and name.startswith("lm_head.")):
                continue  # scales travel with their weight; a tied head is the embedding's own quantized copy
            scheme = self._schemes.get(name)
            if scheme is None:
                self._info[name] = info
                continue
            shape = (info.shape[0], info.shape[1] * 2) if scheme.method == "int4" else tuple(info.shape)
            # the stored type names the scheme ("int4 g32"): quantized, so writers pick float32 unless told
            self._info[name] = TensorInfo(tuple(shape), scheme.describe())
        print(f"notice: {self.path} is a camelid {record.get('quant') or 'quantized'} folder: its weights are "
              "dequantized to float32 on read (the quantization error stays; convert the float source for full "
              "precision)", file=sys.stderr)

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._info)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._info:
            raise CamelidError(f"{self.path}: no tensor named {name!r}")
        scheme = self._schemes.get(name)
        tensor = self._qz.decode(self._raw.read, name, scheme) if scheme is not None else self._raw.read(name)
        return tensor.to(dtype) if dtype is not None else tensor

    def close(self) -> None:
        self._raw.close()


def open_hf(folder: str | Path, **options: Any) -> Any:
    """The reader of an HF folder: a dequantizing one for `camelid quantize` output, else the plain one."""
    record = quantize_record(Path(folder))
    if record is None:
        reader = HFReader(folder)
        if not any(n.endswith(".scales") for n in reader.tensors()):
            return reader
        reader.close()
        record = {"layers": {}}  # quantized tensors with no recorded scheme: refused as such below
    return QuantizedFolderReader(folder, record, **options)
