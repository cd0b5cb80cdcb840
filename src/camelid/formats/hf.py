"""Hugging Face checkpoints: a folder of safetensors (sharded with an index) or pytorch_model*.bin files.

`.bin` files are pickles; they are opened only through `torch.load(weights_only=True, mmap=True)`,
which refuses arbitrary code and maps the data instead of reading it.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CamelidError
from .atomic import atomic_output
from .base import TensorInfo
from .source import TOKENIZER_FILES  # noqa: F401  # (re-exported: what an HF folder's tokenizer may hold)

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


# ---- writing --------------------------------------------------------------------------------------
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}
DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' default max_shard_size ("5GB")


def _split_shards(plan: list, shard_size: int) -> list[list]:
    """Consecutive tensors grouped so that no shard exceeds `shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for p in plan:
        nbytes = math.prod(p.shape) * p.dtype.itemsize
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes
    return shards


class HFWriter:
    """A complete Hugging Face folder: safetensors shards + index, config.json, generation_config.json, tokenizer.

    The headers are written first from the plan (every name, shape and dtype, known before conversion
    starts), so each tensor goes straight to its place in its shard and is dropped.
    """

    def __init__(self, out: Path, config: Any, *, plan: list, shard_size: int | None = None, force: bool = False,
                 tokenizer_files: dict[str, Path] | None = None, chat_template: str | None = None, **_options: Any):
        self.config, self.chat_template = config, chat_template
        self.tokenizer_files = tokenizer_files or {}
        self._ctx = atomic_output(out, force=force, is_dir=True)
        self.tmp = self._ctx.__enter__()
        try:  # the files are created at full size here: a full disk fails now, and must remove the output
            self._create(plan, shard_size)
        except BaseException as e:
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise

    def _create(self, plan: list, shard_size: int | None) -> None:
        shards = _split_shards(list(plan), shard_size or DEFAULT_SHARD_SIZE)
        self._where: dict[str, tuple[Any, int, Any]] = {}  # name -> (file, data offset, planned tensor)
        self._files = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.dtypes = {p.dtype for p in plan}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for p in shard:
                nbytes = math.prod(p.shape) * p.dtype.itemsize
                header[p.name] = {"dtype": _ST_DTYPES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
            f = open(self.tmp / fname, "wb")
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
            self._files.append(f)
            for p in shard:
                self._where[p.name] = (f, 8 + len(raw) + header[p.name]["data_offsets"][0], p)
                self.weight_map[p.name] = fname
            self.total_size += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise CamelidError(f"tensor {name!r} was not planned for this output")
        f, offset, p = self._where.pop(name)
        if tuple(tensor.shape) != tuple(p.shape) or tensor.dtype != p.dtype:
            raise CamelidError(f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned {p.shape} {p.dtype}")
        f.seek(offset)
        f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))

    def finish(self) -> None:
        if self._where:
            raise CamelidError(f"{len(self._where)} planned tensors were never written, e.g. {next(iter(self._where))!r}")
        for f in self._files:
            f.close()
        if len(self._files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        cfg = self.config.to_hf_dict()
        if len(self.dtypes) == 1:
            cfg["torch_dtype"] = str(next(iter(self.dtypes))).removeprefix("torch.")
            cfg["dtype"] = cfg["torch_dtype"]  # transformers 5 reads `dtype`
        (self.tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id}
        (self.tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        self._write_tokenizer()
        self._ctx.__exit__(None, None, None)

    def _write_tokenizer(self) -> None:
        for fname, path in self.tokenizer_files.items():
            shutil.copyfile(path, self.tmp / fname)
        if self.chat_template is None or not (self.tmp / "tokenizer.json").is_file() and not (self.tmp / "tokenizer.model").is_file():
            return
        # transformers reads the template from tokenizer_config.json; keep everything else that file says.
        tc_path = self.tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        if not tc.get("chat_template"):
            tc["chat_template"] = self.chat_template
            tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    def abort(self) -> None:
        for f in self._files:
            f.close()
        exc = CamelidError("aborted")
        self._ctx.__exit__(type(exc), exc, None)
