"""Hugging Face checkpoints: a folder of safetensors (sharded with an index) or pytorch_model*.bin files.

`.bin` files are pickles; they are opened only through `torch.load(weights_only=True, mmap=True)`,
which refuses arbitrary code and maps the data instead of reading it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CamelidError
from .base import TensorInfo

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
                torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: safetensors first (index order when there is one), else .bin."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CamelidError(f"{index}: not a valid shard index ({e})") from None
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CamelidError(f"{index} names shard files that are missing: {', '.join(missing)}")
            return files
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


class HFReader:
    """Lazy reader over the weight files of one Hugging Face model folder."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        if not self.path.is_dir():
            raise CamelidError(f"{self.path}: not a folder")
        files = weight_files(self.path)
        if not files:
            raise CamelidError(f"{self.path}: no weights found (expected model*.safetensors or pytorch_model*.bin)")
        config = self.path / "config.json"
        self.metadata: dict[str, Any] = json.loads(config.read_text()) if config.is_file() else {}
        self._where: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            if f.suffix == ".safetensors":
                try:
                    with safe_open(f, framework="pt") as st:
                        for name in st.keys():
                            sl = st.get_slice(name)
                            self._where[name] = f
                            self._info[name] = TensorInfo(tuple(sl.get_shape()), sl.get_dtype())
                except Exception as e:  # safetensors raises its own error types on damaged headers
                    raise CamelidError(f"{f}: not a readable safetensors file ({e}); it may be truncated or corrupt") from None
            else:
                sd = self._load_bin(f)
                for name, t in sd.items():
                    self._where[name] = f
                    self._info[name] = TensorInfo(tuple(t.shape), _DTYPE_NAMES.get(t.dtype, str(t.dtype)))

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._bins:
            try:
                self._bins[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CamelidError(f"{f}: cannot be loaded safely as a weights-only checkpoint ({e})") from None
        return self._bins[f]

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._info)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._where:
            raise CamelidError(f"{self.path}: no tensor named {name!r}")
        f = self._where[name]
        if f.suffix == ".safetensors":
            try:
                with safe_open(f, framework="pt") as st:
                    tensor = st.get_tensor(name)
            except Exception as e:
                raise CamelidError(f"{f}: tensor {name!r} could not be read ({e}); the file may be truncated") from None
        else:
            tensor = self._load_bin(f)[name]
        return tensor.to(dtype) if dtype is not None else tensor

    def close(self) -> None:
        self._bins.clear()
