"""The format registry: open any checkpoint as a lazy reader, map it to canonical (HF) tensors, and
pick the writer of an output format.

A format plugs in with three entries, all keyed by its name ("hf", "meta", "gguf", "easylm", "flm"):
  READERS[name]  = opener(path: Path, **options) -> TensorReader   (its `.format` is the name)
  LAYOUTS[name]  = Layout: how its native names/rows relate to HF's (the functions live in names.py)
  WRITERS[name]  = factory(out: Path, config, *, plan, dtype, **options) -> TensorWriter  (see `writer_for`)
and, to be found from a user's SRC string, SPEC_PREFIXES ("params" -> "easylm" for `params::PATH`)
or FILE_SUFFIXES (".gguf" -> "gguf"). Folders are told apart by their files (`detect_folder`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CamelidError, disk_full_error, is_disk_full
from . import names
from .base import StoredQuantReader, StoredTensor, TensorInfo, TensorReader, TensorWriter  # noqa: F401


def _same(name: str) -> str:
    return name


def _never(name: str) -> bool:  # noqa: ARG001
    return False


@dataclass(frozen=True)
class Layout:
    """How one format stores the canonical tensors: names both ways, interleaved q/k rows, transposed kernels."""
    to_hf: Callable[[str], str | None]  # native name -> HF name; None = a tensor the model does not need
    from_hf: Callable[[str], str]  # HF name -> native name
    interleaved: bool = False  # q/k rows in Meta's complex-pair order (Meta, EasyLM, GGUF)
    transposed: Callable[[str], bool] = field(default=_never)  # native tensor stored in x out (EasyLM kernels)
    untied: bool = False  # always stores an output matrix, even for tied-embedding models (Meta, EasyLM)


@dataclass(frozen=True)
class PlannedTensor:
    """What a writer will receive for one tensor, known before the first byte is written (headers need it)."""
    name: str  # native name in the output format
    shape: tuple[int, ...]
    dtype: torch.dtype


READERS: dict[str, Callable[..., TensorReader]] = {}
WRITERS: dict[str, Callable[..., TensorWriter]] = {}
LAYOUTS: dict[str, Layout] = {}
SPEC_PREFIXES: dict[str, str] = {}  # "params" -> "easylm": SRC strings like "params::PATH"
FILE_SUFFIXES: dict[str, str] = {}  # ".gguf" -> "gguf"
QUANT_TYPES: dict[str, tuple[str, ...]] = {}  # "gguf" -> ("q8_0", "q4_0", "q4_1"): what --quant may say


def register(fmt: str, *, reader: Callable[..., TensorReader] | None = None,
             writer: Callable[..., TensorWriter] | None = None, layout: Layout | None = None,
             prefixes: tuple[str, ...] = (), suffixes: tuple[str, ...] = (), quants: tuple[str, ...] = ()) -> None:
    """Plug a format in (called at import time by each format module, or below for the built-in ones)."""
    if reader is not None:
        READERS[fmt] = reader
    if writer is not None:
        WRITERS[fmt] = writer
    if layout is not None:
        LAYOUTS[fmt] = layout
    for p in prefixes:
        SPEC_PREFIXES[p] = fmt
    for s in suffixes:
        FILE_SUFFIXES[s] = fmt
    if quants:
        QUANT_TYPES[fmt] = quants


def detect_folder(folder: Path) -> str:
    """'meta' for consolidated.*.pth + params.json, 'hf' for safetensors/.bin weights."""
    if any(folder.glob("consolidated.*.pth")):
        return "meta"
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        return "hf"
    raise CamelidError(f"{folder}: no checkpoint found (expected model*.safetensors, pytorch_model*.bin, "
                       "or consolidated.NN.pth with params.json)")


def parse_source(src: str | Path) -> tuple[str, Path, str | None]:
    """A user's SRC -> (format, path, spec prefix or None). Checks the path exists."""
    text = str(src)
    prefix = None
    if "::" in text:
        prefix, text = text.split("::", 1)
        if prefix not in SPEC_PREFIXES:
            known = ", ".join(f"{p}::" for p in SPEC_PREFIXES) or "none registered"
            raise CamelidError(f"unknown load spec prefix {prefix + '::'!r} in {src!r} (known: {known})")
    path = Path(text).expanduser()
    if not path.exists():
        raise CamelidError(f"{path}: no such file or folder")
    if prefix is not None:
        return SPEC_PREFIXES[prefix], path, prefix
    if path.is_dir():
        return detect_folder(path), path, None
    fmt = FILE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise CamelidError(f"{path}: unknown checkpoint file type {path.suffix!r} (known: "
                           f"{', '.join(sorted(FILE_SUFFIXES))}; EasyLM files need a prefix like params::{path})")
    return fmt, path, None


def open_reader(src: str | Path, **options: Any) -> TensorReader:
    """A lazy reader for a folder (HF or Meta), a file (.gguf, .flm) or a spec like `params::PATH`."""
    fmt, path, prefix = parse_source(src)
    if fmt not in READERS:
        raise CamelidError(f"{path}: reading the {fmt!r} format is not available")
    if prefix is not None:
        options["prefix"] = prefix
    reader = READERS[fmt](path, **options)
    reader.format = fmt
    return reader


def stored_quantized(reader: TensorReader) -> dict[str, str]:
    """Native name -> scheme of the tensors `reader` can hand out as stored quantized (`reader.stored(name)`);
    {} for a reader of float tensors only."""
    return reader.quantized() if isinstance(reader, StoredQuantReader) else {}


def layout_of(fmt: str) -> Layout:
    if fmt not in LAYOUTS:
        raise CamelidError(f"no name table for the {fmt!r} format")
    return LAYOUTS[fmt]


def to_canonical(fmt: str, native: str, tensor: torch.Tensor, n_heads: int, n_kv_heads: int) -> tuple[str | None, torch.Tensor]:
    """One native tensor -> (HF name, tensor in HF layout); (None, tensor) for tensors to skip."""
    layout = layout_of(fmt)
    hf = layout.to_hf(native)
    if hf is None:
        return None, tensor
    if layout.transposed(native):
        tensor = tensor.T
    if layout.interleaved:
        heads = names.rotary_heads(hf, n_heads, n_kv_heads)
        if heads:
            tensor = names.from_interleaved(tensor, heads)
    return hf, tensor.contiguous()


def from_canonical(fmt: str, hf: str, tensor: torch.Tensor, n_heads: int, n_kv_heads: int) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (native name, tensor in the format's layout); the inverse of `to_canonical`."""
    layout = layout_of(fmt)
    native = layout.from_hf(hf)
    if layout.interleaved:
        heads = names.rotary_heads(hf, n_heads, n_kv_heads)
        if heads:
            tensor = names.to_interleaved(tensor, heads)
    if layout.transposed(native):
        tensor = tensor.T
    return native, tensor.contiguous()


def native_shape(fmt: str, hf: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The native name and shape an HF tensor of `shape` gets in `fmt` (permutations keep shapes)."""
    layout = layout_of(fmt)
    native = layout.from_hf(hf)
    return native, tuple(reversed(shape)) if layout.transposed(native) else tuple(shape)


def canonical_infos(reader: TensorReader) -> dict[str, tuple[str, TensorInfo]]:
    """HF name -> (native name, stored info with the HF shape), without reading any data."""
    fmt = getattr(reader, "format", None) or "hf"
    layout = layout_of(fmt)
    out: dict[str, tuple[str, TensorInfo]] = {}
    for native, info in reader.tensors().items():
        hf = layout.to_hf(native)
        if hf is None:
            continue
        shape = tuple(reversed(info.shape)) if layout.transposed(native) else info.shape
        out[hf] = (native, TensorInfo(shape, info.dtype))
    return out


def writer_for(fmt: str, out: str | Path, config: Any, **options: Any) -> TensorWriter:
    """The writer of `fmt` at `out`. Options convert passes: plan (list of PlannedTensor), force, quant, group,
    shards, shard_size, tokenizer_files ({file name: Path}), tokenizer_metadata (GGUF tokenizer.* keys),
    chat_template, prompt_template (the model's template as an object, for writers that render it: see
    flm_vocab.prompt_keys), source_metadata. A writer takes what it needs and ignores the rest (**options)."""
    if fmt not in WRITERS:
        raise CamelidError(f"unknown output format {fmt!r} (known: {', '.join(sorted(WRITERS))})")
    try:
        return WRITERS[fmt](Path(out), config, **options)
    except OSError as e:  # a writer that creates its files up front can meet a full disk here
        if is_disk_full(e):
            raise disk_full_error(out) from None
        raise


def _hf_skip(name: str) -> str | None:
    # transformers 4.x once saved the rotary inverse frequencies; the model recomputes them.
    return None if name.endswith("rotary_emb.inv_freq") else name


def _register_builtin() -> None:
    from . import gguf as _gguf
    from . import gguf_writer as _gguf_writer
    from . import hf as _hf
    from . import meta as _meta
    from . import quantized as _quantized
    register("hf", reader=_quantized.open_hf, writer=_hf.HFWriter, layout=Layout(_hf_skip, _same))
    register("meta", reader=_meta.MetaReader, writer=_meta.MetaWriter,
             layout=Layout(names.meta_to_hf, names.hf_to_meta, interleaved=True, untied=True))
    register("gguf", reader=_gguf.GGUFReader, writer=_gguf_writer.GGUFWriter,
             layout=Layout(names.gguf_to_hf, names.hf_to_gguf, interleaved=True), suffixes=(".gguf",),
             quants=("q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"))
    # Formats written by other modules register themselves when imported; import them if present.
    import importlib
    for module in ("easylm", "flm"):
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise


_register_builtin()
