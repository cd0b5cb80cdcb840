"""Meta's original LLaMA checkpoints: `consolidated.NN.pth` model-parallel shards + `params.json`.

Native names and interleaved q/k rows are Meta's (`names.py` maps them). A `.pth` file is a zip of a
pickle (`data.pkl`) plus one record per storage (`data/0`, `data/1`, ...). Instead of `torch.load`,
which would either read every shard whole or map it (and the mapped pages then count against the
process until the file is closed), we unpickle `data.pkl` with an allow-list that only records where
each tensor lives, and read one storage record when that tensor is asked for. Writing is the mirror
image: records are streamed as tensors arrive and `data.pkl` is added last, so nothing is held.
Both stay loadable by plain `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import shutil
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CamelidError
from . import names
from .atomic import atomic_output
from .base import TensorInfo

# The storage classes a checkpoint may name, and the dtype each stands for.
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
_DTYPE_STORAGE = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}
_TYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class _Stored:
    """Where one tensor of a .pth lives: storage record key, dtype, element offset, shape and strides."""
    key: str
    dtype: torch.dtype
    numel: int  # of the whole storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild(storage, offset, shape, stride, *_ignored) -> _Stored:
    key, dtype, numel = storage
    return _Stored(key, dtype, numel, int(offset), tuple(shape), tuple(stride))


class _IndexUnpickler(pickle.Unpickler):
    """Reads data.pkl into {name: _Stored}; refuses any global a plain state dict does not need."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a weights-only checkpoint")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        return (str(key), dtype, int(numel))


class PthFile:
    """Lazy access to the tensors of one torch zip checkpoint."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._zip = torch._C.PyTorchFileReader(str(path))
            index = _IndexUnpickler(io.BytesIO(self._zip.get_record("data.pkl"))).load()
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
            raise CamelidError(f"{path}: not a readable torch checkpoint ({e}); it may be truncated, corrupt, "
                               "or an old non-zip .pth (re-save it with a current torch)") from None
        if not isinstance(index, dict) or not all(isinstance(v, _Stored) for v in index.values()):
            raise CamelidError(f"{path}: does not hold a flat dict of tensors")
        self.index: dict[str, _Stored] = dict(index)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, read from the file straight into its memory (into `out` when given and contiguous)."""
        s = self.index[name]
        numel = math.prod(s.shape)
        dense = s.offset == 0 and numel == s.numel and tuple(s.stride) == _contiguous_strides(s.shape)
        target = out if out is not None and out.is_contiguous() else torch.empty(s.shape, dtype=s.dtype)
        if not dense:  # a view into a shared storage (not what Meta writes): read the storage, then copy
            target.copy_(self._storage(name, s).as_strided(s.shape, s.stride, s.offset))
        else:
            # Records are stored uncompressed: read the bytes into place, no intermediate buffer.
            start = self._zip.get_record_offset(f"data/{s.key}")
            view = memoryview(target.view(-1).view(torch.uint8).numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(start)
                got = f.readinto(view)
            if got != len(view):
                raise CamelidError(f"{self.path}: tensor {name!r} is cut short ({got} of {len(view)} bytes); "
                                   "the file is truncated, download it again")
        if out is not None and target is not out:
            out.copy_(target)
            return out
        return target

    def _storage(self, name: str, s: _Stored) -> torch.Tensor:
        try:
            storage = self._zip.get_storage_from_record(f"data/{s.key}", s.numel, s.dtype)
        except RuntimeError as e:
            raise CamelidError(f"{self.path}: tensor {name!r} could not be read ({e}); the file may be truncated") from None
        return torch.empty(0, dtype=s.dtype).set_(storage.untyped_storage())


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


class MetaReader:
    """All `consolidated.NN.pth` shards of a folder as one set of full tensors (joined per Meta's axes)."""

    def __init__(self, folder: str | Path, **_options: Any):
        self.path = Path(folder)
        files = sorted(self.path.glob("consolidated.*.pth"), key=lambda f: int(f.name.split(".")[1]))
        if not files:
            raise CamelidError(f"{self.path}: no consolidated.NN.pth files")
        numbers = [int(f.name.split(".")[1]) for f in files]
        if numbers != list(range(len(files))):
            raise CamelidError(f"{self.path}: shard files {numbers} are not numbered 0..{len(files) - 1}; one is missing")
        params = self.path / "params.json"
        try:
            self.metadata: dict[str, Any] = json.loads(params.read_text()) if params.is_file() else {}
        except json.JSONDecodeError as e:
            raise CamelidError(f"{params}: not valid JSON ({e})") from None
        self._shards = [PthFile(f) for f in files]
        first = self._shards[0].index
        for shard in self._shards[1:]:
            if shard.index.keys() != first.keys():
                odd = sorted(set(shard.index) ^ set(first))[0]
                raise CamelidError(f"{shard.path}: tensor {odd!r} is not in every shard; the shards do not belong together")
        self._info: dict[str, TensorInfo] = {}
        for name, s in first.items():
            shape = list(s.shape)
            axis = names.meta_shard_axis(name) if name not in names.META.ignored else None
            if axis is not None:
                shape[axis] = sum(sh.index[name].shape[axis] for sh in self._shards)
            self._info[name] = TensorInfo(tuple(shape), _TYPE_NAMES.get(s.dtype, str(s.dtype)))

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._info)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._info:
            raise CamelidError(f"{self.path}: no tensor named {name!r}")
        axis = names.meta_shard_axis(name) if name not in names.META.ignored else None
        if axis is None or len(self._shards) == 1:
            tensor = self._shards[0].read(name)
        else:
            # Each shard's part goes straight into its slice of the full tensor: no list of parts, no cat.
            info = self._info[name]
            tensor = torch.empty(info.shape, dtype=self._shards[0].index[name].dtype)
            start = 0
            for sh in self._shards:
                size = sh.index[name].shape[axis]
                sh.read(name, out=tensor.narrow(axis, start, size))
                start += size
        return tensor.to(dtype) if dtype is not None else tensor

    def tokenizer_dir(self) -> Path | None:
        """Meta ships tokenizer.model beside the size folders (llama/7B, llama/tokenizer.model); camelid's
        Meta outputs hold the source's tokenizer files in the folder itself."""
        for folder in (self.path, self.path.parent):
            if (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
                return folder
        return None

    def close(self) -> None:
        self._shards.clear()


class _StorageRef:
    def __init__(self, dtype: torch.dtype, key: str, numel: int):
        self.storage_type = getattr(torch, _DTYPE_STORAGE[dtype])
        self.key, self.numel = key, numel


class _TensorRef:
    """Pickles as `_rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())`, as torch.save does."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), _contiguous_strides(self.shape),
                                                 False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


class _GuardedFile:
    """The file under torch's zip writer. If a write fails (disk full, `ulimit -f`), torch's C++ writer aborts the
    whole process when it is destroyed (its destructor writes the zip's end again and throws): so the first
    error is kept for `_PthWriter` to raise, and later writes are dropped."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115  # closed by _PthWriter.close
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as e:
                self.error = e
        return memoryview(data).nbytes

    def check(self) -> None:
        if self.error is not None:
            raise self.error


class _PthWriter:
    """Streams tensors into one torch zip checkpoint; `close()` adds the index (data.pkl)."""

    def __init__(self, path: Path):
        self._file = _GuardedFile(path)
        self._zip = torch._C.PyTorchFileWriter(self._file)
        self._entries: OrderedDict[str, _TensorRef] = OrderedDict()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a shard's chunk is a view into the whole tensor: store only its part
        key = str(len(self._entries))
        self._zip.write_record(f"data/{key}", tensor.untyped_storage(), tensor.nbytes)
        self._file.check()
        self._entries[name] = _TensorRef(_StorageRef(tensor.dtype, key, tensor.numel()), tuple(tensor.shape))

    def close(self) -> None:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(self._entries)
        for name, value in (("data.pkl", buf.getvalue()), ("byteorder", sys.byteorder.encode())):
            self._zip.write_record(name, value, len(value))
        self._zip.write_end_of_file()
        self._file.check()
        self._file.file.close()


class MetaWriter:
    """Writes `consolidated.NN.pth` (split into `shards` model-parallel pieces) + params.json + tokenizer.model."""

    def __init__(self, out: Path, config: Any, *, shards: int | None = None, force: bool = False,
                 tokenizer_files: dict[str, Path] | None = None, **_options: Any):
        self.shards = shards or 1
        for name, n in (("attention heads", config.num_heads), ("kv heads", config.num_kv_heads)):
            if n % self.shards:
                raise CamelidError(f"cannot split {n} {name} into {self.shards} Meta shards; pick a divisor of {n}")
        self.config, self.tokenizer_files = config, tokenizer_files or {}
        self._ctx = atomic_output(out, force=force, is_dir=True)
        self.tmp = self._ctx.__enter__()
        self._files = [_PthWriter(self.tmp / f"consolidated.{i:02d}.pth") for i in range(self.shards)]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        axis = names.meta_shard_axis(name)
        if axis is None or self.shards == 1:
            parts = [tensor] * self.shards
        else:
            if tensor.shape[axis] % self.shards:
                raise CamelidError(f"tensor {name!r}: axis {axis} of size {tensor.shape[axis]} does not split "
                                   f"into {self.shards} Meta shards")
            parts = torch.chunk(tensor, self.shards, dim=axis)
        for f, part in zip(self._files, parts):
            f.write(name, part)

    def finish(self) -> None:
        for f in self._files:
            f.close()
        params = self.config.to_meta_params()
        (self.tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        # Meta's own releases ship only tokenizer.model; the other files (tokenizer.json, the chat template)
        # go beside it too, so that a Meta folder converted onward keeps a working tokenizer and template.
        for fname, path in self.tokenizer_files.items():
            shutil.copyfile(path, self.tmp / fname)
        self._files.clear()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._files.clear()
        exc = CamelidError("aborted")
        self._ctx.__exit__(type(exc), exc, None)
