"""A `camelid quantize` folder read as float weights, so it can be converted or re-quantized.

The folder stores each quantized linear layer as integers + scales (+ zeros), per the scheme camelid.json
records under "layers" ("int8", "int8 g128", "int4 g32"); the embedding may be stored the same way ("embedding"; older folders:
"quantized_embeddings", int8 rows). This reader shows the model's own tensor names and float32 shapes and dequantizes
on read, with the schemes the folder records (never guessed from shapes). The quantization error stays:
the notice says so, and how to get full precision back (start from the float source).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import CamelidError
from .base import StoredTensor, TensorInfo
from .hf import HFReader

EMBED = "model.embed_tokens.weight"


def quantize_record(folder: Path) -> dict[str, Any] | None:
    """camelid.json of a `camelid quantize` folder (it has "layers"); None for any other folder."""
    described = folder / "camelid.json"
    if not described.is_file():
        return None
    try:
        info = json.loads(described.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("layers"), dict) else None


def _parse_scheme(text: str, where: Path, layer: str) -> tuple[str, int]:
    parts = text.split()
    try:
        method = parts[0]
        group = int(parts[1][1:]) if len(parts) > 1 and parts[1].startswith("g") else 0
    except (IndexError, ValueError):
        method, group = "", 0
    if method not in ("int8", "int4") or (method == "int4" and not group):
        raise CamelidError(f"{where}/camelid.json: layer {layer!r} has an unknown scheme {text!r}; the folder was "
                           "edited or written by a newer camelid")
    return method, group


class QuantizedFolderReader:
    """HF names and float32 tensors of a `camelid quantize` folder, dequantized one tensor at a time."""

    def __init__(self, folder: str | Path, record: dict[str, Any], **_options: Any):
        self._raw = HFReader(folder)
        self.path, self.metadata = self._raw.path, self._raw.metadata
        where = self.path
        self._schemes = {layer + ".weight": _parse_scheme(str(s), where, layer) for layer, s in record["layers"].items()}
        embedding = record.get("embedding") or ("int8" if record.get("quantized_embeddings") else None)
        if embedding:
            self._schemes[EMBED] = _parse_scheme(str(embedding), where, "model.embed_tokens")
        raw = self._raw.tensors()
        tied = bool(self.metadata.get("tie_word_embeddings", False))
        self._info: dict[str, TensorInfo] = {}
        for name, info in raw.items():
            if name.endswith((".scales", ".zeros")) or (tied and name.startswith("lm_head.")):
                continue  # scales travel with their weight; a tied head is the embedding's own quantized copy
            shape = info.shape
            if self._schemes.get(name, ("", 0))[0] == "int4":
                shape = (shape[0], shape[1] * 2)
            # the stored type names the scheme ("int4 g32"): quantized, so writers pick float32 unless told
            method, group = self._schemes.get(name, (None, 0))
            self._info[name] = TensorInfo(tuple(shape), f"{method} g{group}" if group else method or info.dtype)
        missing = [n for n in self._schemes if n not in raw and not (tied and n.startswith("lm_head."))]
        if missing:
            raise CamelidError(f"{where}: camelid.json names a quantized layer {missing[0]!r} the weights lack")
        self._quant = record.get("quant", "quantized")
        self._told = False  # the notice comes with the first dequantized layer (the loader keeps them as stored)

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._info)

    def quantized(self) -> dict[str, str]:
        """Layers stored quantized (a tied head's own copy included) -> their scheme as camelid.json records it."""
        return {name: f"{method} g{group}" if group else method for name, (method, group) in self._schemes.items()
                if name in self._raw.tensors()}

    def stored(self, name: str) -> StoredTensor:
        """One quantized layer as stored: its integer codes (int4: two per byte), scales and zeros."""
        if name not in self._schemes:
            raise CamelidError(f"{self.path}: tensor {name!r} is not stored quantized")
        method, group = self._schemes[name]
        base = name.removesuffix(".weight")
        zeros = self._raw.read(base + ".zeros") if group else None
        shape = self._info[name].shape if name in self._info else self._raw.tensors()[name].shape
        return StoredTensor(self.quantized()[name], tuple(shape), self._raw.read(name),
                            self._raw.read(base + ".scales"), zeros)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._info:
            raise CamelidError(f"{self.path}: no tensor named {name!r}")
        if name not in self._schemes:
            tensor = self._raw.read(name)
        else:
            if not self._told:
                self._told = True
                print(f"notice: {self.path} is a camelid {self._quant} folder: its weights are dequantized to float32 "
                      "on read (the quantization error stays; convert the float source for full precision)",
                      file=sys.stderr)
            tensor = dequantize(self.stored(name))
        return tensor.to(dtype) if dtype is not None else tensor

    def close(self) -> None:
        self._raw.close()


def dequantize(stored: StoredTensor) -> torch.Tensor:
    """A `camelid quantize` layer back to float32 (int4 groups, int8 groups, or int8 per row)."""
    from .. import quantize as qz
    if stored.scheme.startswith("int4"):
        return qz.dequantize_int4(qz.unpack_nibbles(stored.data), stored.scales, stored.zeros)
    if stored.zeros is not None:
        return qz.dequantize_int8_grouped(stored.data, stored.scales, stored.zeros)
    return qz.dequantize_int8(stored.data, stored.scales)


def open_hf(folder: str | Path, **options: Any) -> Any:
    """The reader of an HF folder: a dequantizing one for `camelid quantize` output, else the plain one."""
    record = quantize_record(Path(folder))
    return QuantizedFolderReader(folder, record, **options) if record is not None else HFReader(folder)
