"""EasyLM (Koala) checkpoints: streaming msgpack files and flax msgpack documents, read lazily, written as a stream.

A *streaming* file (`StreamingCheckpointer`) is consecutive msgpack records `[key: array of str, value: bin]`
with no header and no index; each value is a msgpack document as `flax.serialization.to_bytes` makes it for
one array: `ExtType(1, packb([shape, dtype name, C-order bytes]))`, or, for arrays over `MAX_CHUNK_SIZE`
bytes, a map `{'__msgpack_chunked_array__': True, 'shape': {'0': d0, ..}, 'chunks': {'0': ext, ..}}` of
flat slices. A *flax_params* file is one `msgpack_serialize` document of the nested params dict.

Reading walks the msgpack structure itself, taking small items (keys, shapes, dtype names) and only the
offset and length of byte payloads, so opening a 60 GB file reads a few bytes per tensor and one tensor
is read on demand straight into its memory. Native names are key paths joined with "/"
("transformer/h/0/attention/wq/kernel"); `names.py` maps them to HF names.

Load specs (EasyLM's): `params::PATH` a params file; `trainstate::PATH` a whole train state (the model's
weights are the ('params', 'params', ...) keys; step and optimizer state are listed but not model
tensors); `trainstate_params::PATH` only the ('params', 'params', ...) keys, prefix stripped;
`flax_params::PATH` one flax msgpack document. PATH may be a folder written by camelid (the file
`streaming_params` + config.json + tokenizer + camelid.json), which then describes itself.

Writing: OUT with a file extension, or named `streaming_*`, is one bare streaming file; any other OUT is
a folder holding `streaming_params` plus config.json, tokenizer files and camelid.json.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import torch

from ..config import ModelConfig
from ..errors import CamelidError
from . import Layout, manifest, names, register
from .atomic import atomic_output
from .base import TensorInfo

# flax.serialization.MAX_CHUNK_SIZE: an array of more bytes than this is stored as flat chunks of
# int(MAX_CHUNK_SIZE / itemsize) elements. Tests lower it to exercise chunking on small arrays.
MAX_CHUNK_SIZE = 2**30
PARAMS_FILE, TRAINSTATE_FILE = "streaming_params", "streaming_train_state"
_CHUNKED = "__msgpack_chunked_array__"
_EXT_NDARRAY, _EXT_NPSCALAR = 1, 3  # flax's msgpack ext type codes for arrays and numpy scalars
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
          "uint8": torch.uint8, "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
          "bool": torch.bool}
_NAME = {dtype: name for name, dtype in _TORCH.items()}
_SHORT = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


# ---- reading: a msgpack walker that keeps payload positions, not payloads -------------------------
@dataclass(frozen=True)
class _Blob:
    """A bin (code None) or ext payload: where its bytes are in the file."""
    offset: int
    length: int
    code: int | None = None


@dataclass(frozen=True)
class _Array:
    shape: tuple[int, ...]
    dtype: str
    parts: tuple[tuple[int, int], ...]  # (file offset, byte count) of each C-order piece, in order


class _Truncated(Exception):
    pass


class _Walker:
    """Parses msgpack items from a file; bin/ext payloads become _Blob positions and are skipped over."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def _take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise _Truncated
        return data

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._take(n), "big")

    def _skip(self, n: int, code: int | None = None) -> _Blob:
        start = self.f.tell()
        if start + n > self.size:
            raise _Truncated
        self.f.seek(n, 1)
        return _Blob(start, n, code)

    def obj(self, str_as_blob: bool = False) -> Any:
        """One item; `str_as_blob`: a str is a payload too (msgpack < 1.0 packed bytes as str by default)."""
        b = self._take(1)[0]
        if str_as_blob and (0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB)):
            return self._skip(b & 0x1F if b <= 0xBF else self._uint(1 << (b - 0xD9)))
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.obj() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return self._take(b & 0x1F).decode("utf-8")
        if b in (0xC0, 0xC2, 0xC3):
            return {0xC0: None, 0xC2: False, 0xC3: True}[b]
        if b in (0xC4, 0xC5, 0xC6):  # bin 8/16/32
            return self._skip(self._uint(1 << (b - 0xC4)))
        if b in (0xC7, 0xC8, 0xC9):  # ext 8/16/32: length, then a signed type byte
            n = self._uint(1 << (b - 0xC7))
            return self._skip(n, struct.unpack("b", self._take(1))[0])
        if b in (0xCA, 0xCB):
            return struct.unpack(">f" if b == 0xCA else ">d", self._take(4 if b == 0xCA else 8))[0]
        if 0xCC <= b <= 0xCF:
            return self._uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            n = 1 << (b - 0xD0)
            return int.from_bytes(self._take(n), "big", signed=True)
        if 0xD4 <= b <= 0xD8:  # fixext 1/2/4/8/16
            code = struct.unpack("b", self._take(1))[0]
            return self._skip(1 << (b - 0xD4), code)
        if b in (0xD9, 0xDA, 0xDB):
            return self._take(self._uint(1 << (b - 0xD9))).decode("utf-8")
        if b in (0xDC, 0xDD):
            return [self.obj() for _ in range(self._uint(2 if b == 0xDC else 4))]
        if b in (0xDE, 0xDF):
            return self._map(self._uint(2 if b == 0xDE else 4))
        raise ValueError(f"byte 0x{b:02x} starts no msgpack item")

    def _map(self, n: int) -> dict:
        out = {}
        for _ in range(n):
            k = self.obj()
            out[k] = self.obj()
        return out

    def array(self, value: Any) -> _Array | None:
        """A flax-serialized array (ext 1/3 or a chunked map) -> _Array; None for anything else."""
        if isinstance(value, _Blob) and value.code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            self.f.seek(value.offset)
            shape, dtype, data = self.obj()
            if not isinstance(data, _Blob) or data.offset + data.length != value.offset + value.length:
                raise ValueError("array payload is not [shape, dtype, bytes]")
            return _Array(tuple(int(d) for d in shape), str(dtype), ((data.offset, data.length),))
        if isinstance(value, dict) and value.get(_CHUNKED) is True:
            chunks = [self.array(value["chunks"][str(i)]) for i in range(len(value["chunks"]))]
            shape = tuple(int(value["shape"][str(i)]) for i in range(len(value["shape"])))
            if any(c is None or c.dtype != chunks[0].dtype for c in chunks):
                raise ValueError("chunked array with chunks of different types")
            return _Array(shape, chunks[0].dtype if chunks else "float32", tuple(p for c in chunks for p in c.parts))
        return None


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        key = (*prefix, str(k))
        if isinstance(v, dict) and v.get(_CHUNKED) is not True:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _is_trainstate_key(key: tuple[str, ...]) -> bool:
    return key[:2] == ("params", "params") or key[0] in names.EASYLM.ignored_roots


class EasyLMReader:
    """Lazy reader of one EasyLM checkpoint, opened by a load spec prefix (see the module docstring)."""

    def __init__(self, path: str | Path, *, prefix: str = "params", **_options: Any):
        self.path, self.prefix = Path(path), prefix
        self.config: ModelConfig | None = None
        self._described: Path | None = None
        file = self._locate()
        self.file = file
        size = file.stat().st_size
        if size == 0:
            raise CamelidError(f"{file}: the file is empty; it is not an EasyLM checkpoint")
        with open(file, "rb") as f:
            walker = _Walker(f, size)
            try:
                entries = self._index(walker, size)
                self._arrays: dict[str, _Array] = {}
                for key, value in entries.items():
                    arr = walker.array(value)
                    if arr is not None:
                        self._arrays["/".join(key)] = arr
            except _Truncated:
                raise CamelidError(f"{file}: cut short at byte {f.tell()} of {size}; the checkpoint is truncated "
                                   "(copy or download it again)") from None
            except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
                raise CamelidError(f"{file}: not a valid EasyLM checkpoint near byte {f.tell()} ({e})") from None
        for name, arr in self._arrays.items():
            nbytes = math.prod(arr.shape) * _TORCH[arr.dtype].itemsize if arr.dtype in _TORCH else None
            if nbytes is not None and sum(n for _, n in arr.parts) != nbytes:
                raise CamelidError(f"{file}: tensor {name!r} holds {sum(n for _, n in arr.parts)} bytes, but shape "
                                   f"{arr.shape} of {arr.dtype} needs {nbytes}; the file is corrupt")
        self.metadata: dict[str, Any] = {"easylm_prefix": prefix, "file": str(file)}
        if "step" in self._arrays and not self._arrays["step"].shape:
            self.metadata["step"] = int(self.read("step").item())

    def _locate(self) -> Path:
        """The checkpoint file; a folder written by camelid names its file and carries config + tokenizer."""
        if self.path.is_dir():
            if self.prefix == "flax_params":
                raise CamelidError(f"{self.path} is a folder; flax_params:: needs the msgpack file itself")
            fname = PARAMS_FILE if self.prefix == "params" else TRAINSTATE_FILE
            if not (self.path / fname).is_file():
                raise CamelidError(f"{self.path}: no {fname} file in this folder for {self.prefix}::; "
                                   "name the checkpoint file itself")
            folder, file = self.path, self.path / fname
        else:
            folder, file = self.path.parent, self.path
        # A camelid-written folder says what it holds; a bare file next to unrelated files is not guessed at.
        described = manifest.field(folder, "format")
        if self.path.is_dir() or (described == "easylm" and file.name == PARAMS_FILE):
            self._described = folder
            if (folder / "config.json").is_file():
                self.config = ModelConfig.from_hf_file(folder / "config.json")
        return file

    def _index(self, walker: _Walker, size: int) -> dict[tuple[str, ...], Any]:
        first = walker.f.read(1)
        walker.f.seek(0)
        streaming = 0x90 <= first[0] <= 0x9F or first[0] in (0xDC, 0xDD)
        flax_doc = 0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF)
        if not streaming and not flax_doc:
            raise CamelidError(f"{walker.f.name}: not an EasyLM checkpoint (it starts with byte 0x{first[0]:02x}, "
                               "neither a streaming record nor a msgpack map)")
        if self.prefix == "flax_params":
            if streaming:
                raise CamelidError(f"{self.path} is a streaming checkpoint, not one flax msgpack document; "
                                   f"load it as {self._streaming_prefix(walker)}::{self.path}")
            entries = _flatten(walker.obj())
            if walker.f.tell() != size:
                raise ValueError("data after the msgpack document")
            return entries
        if flax_doc:
            raise CamelidError(f"{self.path} holds one flax msgpack document, not streaming records; "
                               f"load it as flax_params::{self.path}")
        entries: dict[tuple[str, ...], Any] = {}
        while walker.f.tell() < size:
            if walker.f.read(1) != b"\x92":
                raise ValueError("a record is not [key, value]")
            key, blob = walker.obj(), walker.obj(str_as_blob=True)
            if not (isinstance(key, list) and key and all(isinstance(k, str) for k in key)
                    and isinstance(blob, _Blob) and blob.code is None):
                raise ValueError("a record is not [key: array of str, value: bin]")
            key = tuple(key)
            walker.f.seek(blob.offset)
            entries[key] = walker.obj()  # the value document: positions of its payloads only
            if walker.f.tell() != blob.offset + blob.length:
                raise ValueError(f"value of {'/'.join(key)!r} is not one msgpack document")
        return self._select(entries)

    def _select(self, entries: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
        """Apply the load spec: which keys are the model's, under which names."""
        trainstate = any(_is_trainstate_key(k) for k in entries)
        has_params = any(k[:2] == ("params", "params") for k in entries)
        if self.prefix == "params":
            if trainstate:
                raise CamelidError(f"{self.path} is a train state (keys like params/params/..., step, opt_state), "
                                   f"not a params file; load it as trainstate_params::{self.path}")
            return entries
        if not has_params:
            raise CamelidError(f"{self.path} has no ('params', 'params', ...) keys, so it is not a train state; "
                               f"load it as params::{self.path}")
        if self.prefix == "trainstate_params":
            return {k[2:]: v for k, v in entries.items() if k[:2] == ("params", "params")}
        return {(k[2:] if k[:2] == ("params", "params") else k): v for k, v in entries.items()}  # trainstate

    def _streaming_prefix(self, walker: _Walker) -> str:
        walker.f.seek(1)  # past the record's array header: the key comes first
        return "trainstate_params" if _is_trainstate_key(tuple(walker.obj())) else "params"

    def tensors(self) -> dict[str, TensorInfo]:
        return {n: TensorInfo(a.shape, _SHORT.get(a.dtype, a.dtype)) for n, a in self._arrays.items()}

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._arrays:
            raise CamelidError(f"{self.file}: no tensor named {name!r}")
        arr = self._arrays[name]
        if arr.dtype not in _TORCH:
            raise CamelidError(f"{self.file}: tensor {name!r} has type {arr.dtype!r}, which camelid cannot read")
        tensor = torch.empty(arr.shape, dtype=_TORCH[arr.dtype])
        flat = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        pos = 0
        with open(self.file, "rb", buffering=0) as f:
            for offset, n in arr.parts:  # chunks go straight into their slice of the tensor
                f.seek(offset)
                got = f.readinto(flat[pos:pos + n])
                if got != n:
                    raise CamelidError(f"{self.file}: tensor {name!r} is cut short; the file is truncated")
                pos += n
        return tensor.to(dtype) if dtype is not None else tensor

    def tokenizer_dir(self) -> Path | None:
        return self._described

    def close(self) -> None:
        pass


# ---- writing: records built from headers + the tensor's own memory ---------------------------------
def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 2**16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 2**32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise CamelidError(f"a value of {n} bytes is over msgpack's 4 GiB limit for one record")


def _ext_header(n: int, code: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code])
    for marker, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        if n < 2 ** (8 * width):
            return bytes([marker]) + n.to_bytes(width, "big") + bytes([code])
    raise CamelidError(f"an array of {n} bytes is over msgpack's limit for one chunk")


def _array_pieces(shape: list[int], dtype: str, data: memoryview) -> list:
    """ExtType(1, packb([shape, dtype, bytes])) as pieces: headers as bytes, the data as a view."""
    head = msgpack.packb(shape) + msgpack.packb(dtype) + _bin_header(len(data))
    return [_ext_header(1 + len(head) + len(data), _EXT_NDARRAY), b"\x93", head, data]


def value_pieces(tensor: torch.Tensor) -> list:
    """The bytes flax.serialization.to_bytes gives for this tensor, as pieces (nothing copied)."""
    if tensor.dtype not in _NAME:
        raise CamelidError(f"EasyLM files cannot hold tensors of type {tensor.dtype}")
    t = tensor.contiguous()
    dtype = _NAME[t.dtype]
    data = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    if len(data) <= MAX_CHUNK_SIZE:
        return _array_pieces(list(t.shape), dtype, data)
    step = max(1, int(MAX_CHUNK_SIZE / t.element_size())) * t.element_size()
    starts = range(0, len(data), step)
    packer = msgpack.Packer()
    pieces = [packer.pack_map_header(3), msgpack.packb(_CHUNKED), msgpack.packb(True), msgpack.packb("shape"),
              msgpack.packb({str(i): d for i, d in enumerate(t.shape)}), msgpack.packb("chunks"),
              packer.pack_map_header(len(starts))]
    for i, s in enumerate(starts):
        piece = data[s:s + step]
        pieces += [msgpack.packb(str(i)), *_array_pieces([len(piece) // t.element_size()], dtype, piece)]
    return pieces


def record_pieces(name: str, tensor: torch.Tensor) -> list:
    """One streaming record `[key, value]` for the native name "a/b/c" as pieces."""
    value = value_pieces(tensor)
    total = sum(len(p) for p in value)
    return [b"\x92", msgpack.packb(name.split("/")), _bin_header(total), *value]


def _is_file_name(out: Path) -> bool:
    return bool(out.suffix) or out.name.startswith("streaming_")


class EasyLMWriter:
    """Streams tensors into an EasyLM params file (what `params::` loads), as EasyLM's own checkpointer would.

    OUT with an extension or named `streaming_*` is written as that one file; otherwise OUT is a folder with
    `streaming_params`, config.json and the tokenizer files, so it can be read back with no options.
    """

    def __init__(self, out: Path, config: Any, *, force: bool = False, tokenizer_files: dict[str, Path] | None = None,
                 **_options: Any):
        self.config, self.tokenizer_files = config, tokenizer_files or {}
        self.single = _is_file_name(Path(out))
        self._ctx = atomic_output(out, force=force, is_dir=not self.single)
        self.tmp = self._ctx.__enter__()
        try:
            self._f = open(self.tmp if self.single else self.tmp / PARAMS_FILE, "wb")
        except BaseException:
            self._ctx.__exit__(CamelidError, CamelidError("aborted"), None)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        for piece in record_pieces(name, tensor):
            self._f.write(piece)

    def finish(self) -> None:
        self._f.close()
        if not self.single:
            (self.tmp / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
            for fname, path in self.tokenizer_files.items():
                shutil.copyfile(path, self.tmp / fname)
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._f.close()
        exc = CamelidError("aborted")
        self._ctx.__exit__(type(exc), exc, None)


register("easylm", reader=EasyLMReader, writer=EasyLMWriter,
         layout=Layout(names.easylm_to_hf, names.hf_to_easylm, interleaved=True, transposed=names.easylm_transposed,
                       untied=True),
         prefixes=("params", "trainstate", "trainstate_params", "flax_params"))
