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
from .base import StoredTensor, TensorInfo
from .hf import HFReader

EMBED_MODULE = "model.embed_tokens"  # the embedding's entry among the schemes (camelid.json: "embedding")


def quantize_record(folder: Path) -> dict[str, Any] | None:
    """camelid.json of a `camelid quantize` folder (it records "layers"); None for any other folder."""
    info = manifest.read(folder)
    return info if info is not None and info.get("layers") is not None else None


def recorded_schemes(record: dict[str, Any], where: Path) -> dict[str, Any]:
    """Module name ("model.layers.0.mlp.up_proj", "model.embed_tokens") -> the quantize.Scheme camelid.json records."""
    from .. import quantize as qz
    embedding = record.get("embedding") or ("int8" if record.get("quantized_embeddings") else None)
    recorded = {**(record.get("layers") or {}), **({EMBED_MODULE: embedding} if embedding else {})}
    schemes = {}
    for layer, text in recorded.items():
        try:
            schemes[layer] = qz.Scheme.parse(text)
        except ValueError:
            raise CamelidError(f"{where}/camelid.json: layer {layer!r} has an unknown scheme {text!r}; the folder "
                               "was edited or written by a newer camelid") from None
    return schemes


def check_stored(shapes: dict[str, tuple[int, ...]], schemes: dict[str, Any], where: Path,
                 widths: dict[str, int] | None = None) -> None:
    """Refuse a folder whose stored tensors (`shapes`: name -> stored shape) disagree with the schemes its
    camelid.json records, or that stores quantized tensors camelid.json does not record. `widths`: module ->
    input width when the model is known (the loader), else read off the weights."""
    from ..quantize import stored_pieces
    unrecorded = [n.removesuffix(".scales") for n in shapes if n.endswith(".scales") and n[:-7] not in schemes]
    if unrecorded:
        raise CamelidError(f"{where}: {unrecorded[0]}.scales is stored quantized but camelid.json records no scheme "
                           "for it (\"layers\"); the folder was edited or its camelid.json is not its own: "
                           "quantize the float model again")
    for module, scheme in schemes.items():
        weight = shapes.get(module + ".weight")
        if weight is None:
            continue  # a tied head's copy, or a layer the caller reports as missing
        k = (widths or {}).get(module) or (weight[-1] * 2 if scheme.method == "int4" else weight[-1])
        for name, want, _ in stored_pieces(module + ".weight", scheme, (weight[0], k)):
            if tuple(shapes.get(name, ())) != want:
                raise CamelidError(f"{where}: {name} has shape {tuple(shapes.get(name, ()))}, but camelid.json "
                                   f"records {module} as {scheme.describe()} (shape {want}); the folder is damaged "
                                   "or was edited: quantize the float model again")


class QuantizedFolderReader:
    """HF names and float32 tensors of a `camelid quantize` folder, dequantized one tensor at a time."""

    def __init__(self, folder: str | Path, record: dict[str, Any], **_options: Any):
        from .. import quantize as qz  # the layout's own code (the folder is camelid's, not a peer format)
        self._qz = qz
        self._raw = HFReader(folder)
        self.path, self.metadata = self._raw.path, self._raw.metadata
        raw = self._raw.tensors()
        schemes = recorded_schemes(record, self.path)
        check_stored({n: tuple(i.shape) for n, i in raw.items()}, schemes, self.path)
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
        self._quant = record.get("quant") or "quantized"
        self._told = False  # the notice comes with the first dequantized layer (the loader keeps them as stored)

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._info)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._info:
            raise CamelidError(f"{self.path}: no tensor named {name!r}")
        scheme = self._schemes.get(name)
        if scheme is not None and not self._told:
            self._told = True
            print(f"notice: {self.path} is a camelid {self._quant} folder: its weights are dequantized to float32 on "
                  "read (the quantization error stays; convert the float source for full precision)", file=sys.stderr)
        tensor = self._qz.decode(self._raw.read, name, scheme) if scheme is not None else self._raw.read(name)
        return tensor.to(dtype) if dtype is not None else tensor

    def quantized(self) -> dict[str, str]:
        """Layers stored quantized (a tied head's own copy included) -> their scheme as camelid.json records it."""
        raw = self._raw.tensors()
        return {name: scheme.describe() for name, scheme in self._schemes.items() if name in raw}

    def stored(self, name: str) -> StoredTensor:
        """One quantized layer as stored: its pieces (X.weight codes, X.scales, X.zeros) by name."""
        scheme = self._schemes.get(name)
        if scheme is None or name not in self._raw.tensors():
            raise CamelidError(f"{self.path}: tensor {name!r} is not stored quantized")
        names = [piece for piece, _, _ in self._qz.stored_pieces(name, scheme, (0, 0))]
        pieces = {piece: self._raw.read(piece) for piece in names}
        rows, width = pieces[name].shape
        return StoredTensor(scheme.describe(), (rows, width * 2 if scheme.method == "int4" else width), pieces[name],
                            pieces)

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
