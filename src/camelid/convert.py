"""Any checkpoint format to any other: reader -> canonical (HF) tensor -> cast -> native -> writer.

One tensor at a time, so peak memory is a few copies of the largest tensor plus a fixed overhead,
whatever the model size. The output appears only when complete (the writers build it under a
temporary name); an error, Ctrl-C or SIGTERM leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from . import __version__
from . import quantize as qz
from .config import ModelConfig
from .errors import CamelidError, disk_full_error, is_disk_full
from .formats import (LAYOUTS, QUANT_TYPES, WRITERS, PlannedTensor, canonical_infos, from_canonical, manifest, native_shape,
                      open_reader, to_canonical, writer_for)
from .formats.base import ensure_finite
from .formats.source import Carried, carried_by, source_config  # noqa: F401 (delta imports source_config here)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a LLaMA model with this config has (lm_head unless tied)."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {EMBED: (config.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    if not config.tie_word_embeddings:
        shapes[HEAD] = (config.vocab_size, d)
    return shapes


# ---- what travels with the weights ------------------------------------------------------------------
def template_name(carried: Carried, to: str, out: str | Path) -> str | None:
    """camelid.json's `chat_template`: "embedded" only when the output really holds the model's own template
    (in tokenizer_config.json / chat_template.jinja beside the weights, or in the GGUF / .flm file); None when
    a template must be named at chat time."""
    if not carried.chat_template:
        return None
    if to in ("gguf", "flm"):
        return "embedded"
    return "embedded" if carried.files and Path(str(out)).suffix == "" else None


def prompt_template(chat_template: str | None, model_name: str | None) -> Callable[[Any, Any], Any]:
    """What a writer that renders the model's template (fastllm's prompt keys) calls with the BOS and EOS token
    text: the model's own jinja template, else the built-in template its name matches (the chat registry's
    choice), else None. Here, not in formats/: formats import no chat code."""
    def template_for(bos_token: Any, eos_token: Any) -> Any:
        from .chat import template_for as choose
        try:
            return choose(None, chat_template, model_name, bos_token=bos_token, eos_token=eos_token)[0]
        except CamelidError:  # nothing matches: the writer falls back to fastllm's default keys
            return None
    return template_for


# ---- the conversion ---------------------------------------------------------------------------------
@dataclass
class ConvertResult:
    out: Path
    tensors: int
    bytes_written: int
    seconds: float
    sha256: dict[str, str] = field(default_factory=dict)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def convert(src: str, out: str | Path, to: str, *, dtype: str | None = None, quant: str | None = None,
            shards: int | None = None, shard_size: int | None = None, config: str | None = None,
            tokenizer: str | None = None, force: bool = False, progress: bool = True,
            group: int | None = None) -> ConvertResult:
    """Convert the checkpoint SRC to the format `to` at OUT, tensor by tensor."""
    import time
    start = time.perf_counter()
    if to not in WRITERS:
        raise CamelidError(f"unknown output format {to!r} (known: {', '.join(sorted(WRITERS))})")
    check_layout_options(to, shards, shard_size)
    if quant and quant not in QUANT_TYPES.get(to, ()):
        allowed = ", ".join(QUANT_TYPES.get(to, ())) or "none"
        raise CamelidError(f"--quant {quant} is not available for --to {to} (available: {allowed})")
    reader = open_reader(src)
    carried = Carried()
    try:
        cfg = source_config(reader, config)
        infos = canonical_infos(reader)
        check_tensors(reader.path, infos, cfg)
        out_dtype = _output_dtype(dtype, infos)
        order, plan = plan_output(to, infos, out_dtype)
        carried = carried_by(reader, tokenizer)
        writer = writer_for(to, out, cfg, plan=plan, dtype=out_dtype, quant=quant, shards=shards, shard_size=shard_size,
                            group=group, force=force, tokenizer_files=carried.files,
                            tokenizer_metadata=carried.gguf_metadata, chat_template=carried.chat_template,
                            prompt_template=prompt_template(carried.chat_template, cfg.name),
                            source_metadata=reader.metadata)
        total = sum(math.prod(p.shape) * out_dtype.itemsize for p in plan)

        def canonical(hf: str) -> torch.Tensor:
            native = infos[hf][0] if hf in infos else infos[EMBED][0]
            _, tensor = to_canonical(reader.format, native, reader.read(native), cfg.num_heads, cfg.num_kv_heads)
            cast = tensor.to(out_dtype).contiguous()
            if cast.dtype != tensor.dtype and not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(tensor).all()):
                ensure_finite(hf, cast, _overflow_hint(cast))  # the cast overflowed; a faithful copy passes
            return cast

        def tensors():
            for hf in order:  # no local names: the generator must not hold a tensor while the next one is read
                yield hf, canonical(hf), None

        describe = {"format": to, "dtype": str(out_dtype).removeprefix("torch."), "quant": quant,
                    "source": str(src), "source_format": reader.format, "chat_template": template_name(carried, to, out)}
        sums = write_canonical(writer, to, cfg, tensors(), total=total, describe=describe,
                               desc=Path(str(out)).name, progress=progress, finite=False)
    finally:
        carried.close()
        reader.close()
    return ConvertResult(Path(out), len(order), total, time.perf_counter() - start, sums)


EMBEDDINGS = ("auto", "float32", "int8", "int4")  # how `quantize_checkpoint` stores the embedding
_FLOAT_TYPES = {"F32", "F16", "BF16", "float32", "float16", "bfloat16"}


def embedding_scheme(choice: str, method: str, shape: tuple[int, ...], stored: str) -> qz.Scheme | None:
    """How the embedding is stored: `choice`, or for "auto" the weights' width when the source's embedding
    was already quantized (re-expanding it to float only grows the file), else float32 (None)."""
    if choice not in EMBEDDINGS:
        raise CamelidError(f"--embedding {choice}: use one of {', '.join(EMBEDDINGS)}")
    if choice == "auto":
        choice = "float32" if stored in _FLOAT_TYPES else method
    return None if choice == "float32" else qz.scheme_for(choice, shape)


def _quant_plan(infos: dict[str, tuple[str, Any]], method: str, group: int | None,
                embedding: str) -> dict[str, qz.Scheme | None]:
    """HF name -> how it is stored (None: float32), in output order; a tied output matrix gets its own copy."""
    order = list(infos) + ([HEAD] if HEAD not in infos else [])
    schemes: dict[str, qz.Scheme | None] = {}
    for hf in order:
        shape = tuple((infos[hf] if hf in infos else infos[EMBED])[1].shape)
        head = hf == HEAD and method == "int4"  # the output matrix keeps 8 bits (per channel) in int4 mode
        linear = len(shape) == 2 and hf != EMBED
        schemes[hf] = qz.scheme_for("int8" if head else method, shape, None if head else group) if linear else None
        if hf == EMBED:
            schemes[hf] = embedding_scheme(embedding, method, shape, infos[EMBED][1].dtype)
    return schemes


def quantize_checkpoint(src: str | Path, out: str | Path, method: str, *, group: int | None = None,
                        embedding: str = "auto", force: bool = False, progress: bool = True) -> ConvertResult:
    """Quantize every linear layer of SRC (any readable checkpoint) into a `camelid quantize` folder at OUT
    (the layout: camelid.quantize), the embedding per `embedding` (see `embedding_scheme`); camelid.json
    records every stored scheme ("layers", "embedding") and the sha256 of every stored tensor."""
    import time
    start = time.perf_counter()
    if method not in qz.METHODS:
        raise CamelidError(f"--quant {method}: use int8 or int4")
    reader = open_reader(src)
    try:
        cfg = source_config(reader)
        infos = canonical_infos(reader)
        check_tensors(reader.path, infos, cfg)
        schemes = _quant_plan(infos, method, group, embedding)
        shapes = {hf: tuple((infos[hf] if hf in infos else infos[EMBED])[1].shape) for hf in schemes}
        plan = [PlannedTensor(*piece) for hf, s in schemes.items() for piece in qz.stored_pieces(hf, s, shapes[hf])]
        with carried_by(reader) as carried:
            writer = writer_for("hf", out, cfg, plan=plan, force=force, tokenizer_files=carried.files,
                                chat_template=carried.chat_template)
            total = sum(math.prod(p.shape) * p.dtype.itemsize for p in plan)

            def tensors():
                for hf, scheme in schemes.items():
                    native = infos[hf][0] if hf in infos else infos[EMBED][0]
                    _, tensor = to_canonical(reader.format, native, reader.read(native, torch.float32),
                                             cfg.num_heads, cfg.num_kv_heads)
                    pieces = qz.stored_pieces(hf, scheme, tuple(tensor.shape))
                    for (name, _, dtype), t in zip(pieces, qz.encode(tensor, scheme)):
                        yield name, t.to(dtype).contiguous(), None

            describe = {"format": "hf", "quant": method, "group": group or (32 if method == "int4" else None),
                        "embedding": schemes[EMBED].describe() if schemes[EMBED] else None, "source": str(src),
                        "source_format": reader.format, "chat_template": template_name(carried, "hf", out),
                        "layers": {hf.removesuffix(".weight"): s.describe() for hf, s in schemes.items()
                                   if s and hf != EMBED},
                        "sha256_of": "each stored tensor (quantized integers, scales, zeros) as written"}
            write_canonical(writer, "hf", cfg, tensors(), total=total, describe=describe,
                            desc=Path(str(out)).name, progress=progress)
    finally:
        reader.close()
    return ConvertResult(Path(out), len(plan), total, time.perf_counter() - start)


def write_canonical(writer: Any, to: str, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor, str | None]], *,
                    total: int, describe: dict[str, Any], desc: str = "", progress: bool = True,
                    finite: bool = True) -> dict[str, str]:
    """Stream canonical tensors (HF name, tensor in HF layout and its output dtype, its sha256 if already known)
    into `writer` in the layout of format `to`; add camelid.json (`describe` + sha256 per tensor) to folder
    outputs and finish. On any error, Ctrl-C or SIGTERM (raised from the generator too) the output is removed.
    `finite`: refuse any float tensor with NaN/inf (off for XOR diffs, whose bits are not numbers, for exact
    recovery, which is checked against the target's sha256, and for convert, which checks each cast itself)."""
    sums: dict[str, str] = {}
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            for hf, tensor, digest in tensors:
                if finite:
                    ensure_finite(hf, tensor, _overflow_hint(tensor))
                # The digest is of the canonical tensor (HF name, layout, output dtype), so it checks the
                # same weights whatever format they are later stored in.
                sums[hf] = digest or hashlib.sha256(_bytes(tensor)).hexdigest()
                name, tensor = from_canonical(to, hf, tensor, cfg.num_heads, cfg.num_kv_heads)
                writer.write(name, tensor)
                bar.update(tensor.numel() * tensor.element_size())
                del tensor
        folder = getattr(writer, "tmp", None)
        if folder is not None and Path(folder).is_dir():
            info = {**describe, "camelid_version": __version__, "sha256": sums,
                    "sha256_of": describe.get("sha256_of", "each tensor in Hugging Face name, layout and the output "
                                                          "dtype, before quantization")}
            manifest.write(folder, info)
        writer.finish()
    except BaseException as e:
        writer.abort()
        if is_disk_full(e):
            raise disk_full_error(desc or "the output") from None
        raise
    return sums


def _overflow_hint(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.float16:
        return " (float16 holds values up to 65504: pass --dtype bfloat16 or float32)"
    return ""


def check_tensors(where: Path, infos: dict[str, tuple[str, Any]], cfg: ModelConfig) -> None:
    """Every tensor known and of the shape the config implies, none missing; else one line naming it."""
    expected = expected_shapes(cfg)
    for hf, (native, info) in infos.items():
        if hf not in expected and not (hf == HEAD and cfg.tie_word_embeddings):
            raise CamelidError(f"{where}: tensor {native!r} is not part of a LLaMA model with this config")
        want = expected.get(hf, expected[EMBED])
        if tuple(info.shape) != tuple(want):
            raise CamelidError(f"{where}: tensor {native!r} has shape {tuple(info.shape)} but the config "
                               f"implies {want}; the config does not match the weights")
    missing = [n for n in expected if n not in infos]
    if missing:
        raise CamelidError(f"{where}: {len(missing)} tensors are missing, e.g. {missing[0]!r}")


def plan_output(to: str, infos: dict[str, tuple[str, Any]], dtype: torch.dtype | dict[str, torch.dtype]
                ) -> tuple[list[str], list[PlannedTensor]]:
    """The HF names to write, in source order, and what the writer of `to` will receive for each
    (`dtype`: one for all, or HF name -> dtype)."""
    order = list(infos)
    if LAYOUTS[to].untied and HEAD not in infos:
        order.append(HEAD)  # Meta / EasyLM always store an output matrix: repeat the embedding
    plan = []
    for hf in order:
        name, shape = native_shape(to, hf, (infos[hf] if hf in infos else infos[EMBED])[1].shape)
        plan.append(PlannedTensor(name, shape, dtype if isinstance(dtype, torch.dtype) else
                                  dtype[hf] if hf in dtype else dtype[EMBED]))
    return order, plan


def check_layout_options(to: str, shards: int | None, shard_size: int | None) -> None:
    """--shards (Meta's model-parallel pieces) and --shard-size (HF's file size) each mean one format."""
    if shards is not None and to != "meta":
        hint = "; HF folders are split by size: use --shard-size, e.g. 2GB" if to == "hf" else ""
        raise CamelidError(f"--shards applies to --to meta only (model-parallel pieces){hint}")
    if shards is not None and shards < 1:
        raise CamelidError(f"--shards {shards}: give a positive number of Meta shards (1, 2, 4, 8 ...)")
    if shard_size is not None and to != "hf":
        raise CamelidError("--shard-size applies to --to hf only (the largest safetensors file)")
    if shard_size is not None and shard_size < 1:
        raise CamelidError("--shard-size must be a positive size, e.g. 2GB")


def disk_size(path: str | Path) -> int:
    """Bytes an output takes on disk: the file, or every file in the folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _output_dtype(dtype: str | None, infos: dict) -> torch.dtype:
    if dtype:
        if dtype not in DTYPES:
            raise CamelidError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    # The linear weights decide: GGUF and .flm files keep norms (and .flm the embedding) in F32 whatever
    # type their weights are, so a float16 .flm is a float16 model.
    stored = {_STORED_DTYPES.get(info.dtype) for hf, (_, info) in infos.items() if len(info.shape) == 2 and hf != EMBED}
    if len(stored) == 1 and None not in stored:
        return stored.pop()
    stored |= {_STORED_DTYPES.get(info.dtype) for _, info in infos.values()}
    # Mixed or quantized sources (a GGUF with F32 norms and Q4 weights) have no single type to keep.
    return torch.float32 if torch.float32 in stored or None in stored else max(stored, key=lambda d: d.itemsize)
