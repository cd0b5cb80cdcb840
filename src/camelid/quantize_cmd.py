"""`camelid quantize SRC OUT --quant int8|int4`: write a quantized model folder that camelid loads directly.

The folder is a Hugging Face-style folder (safetensors, config.json, tokenizer, camelid.json) whose linear
layers are stored as camelid's canonical integers, tensor by tensor:
  X.weight  int8 (out, in)                      + X.scales (out,)                    for int8 per output channel
  X.weight  uint8 (out, in)                     + X.scales, X.zeros (out, in/group)  for int8 per group, w = (q - 128) * scale + zero
  X.weight  uint8 (out, in/2), low nibble first + X.scales, X.zeros (out, in/group)  for int4, w = (q - 8) * scale + zero
Scales and zeros are bf16 (what the kernels read). The embedding (--embedding) is stored the same way at the
weights' width (int8 per row, int4 per group: as GGUF files store theirs) or kept float32, and is dequantized
on load; by default it is quantized when the source's already was (a GGUF), else kept float32. A tied output
matrix gets its own quantized copy (lm_head.*), int8 in int4 mode. camelid.json records the scheme of every
quantized tensor ("layers", "embedding") and the sha256 of every stored tensor.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from . import quantize as qz
from .convert import (EMBED, HEAD, ConvertResult, check_tensors, disk_size, source_config, template_name,
                      write_canonical)
from .errors import CamelidError
from .formats import PlannedTensor, canonical_infos, open_reader, to_canonical, writer_for
from .formats.source import carried_by


EMBEDDINGS = ("auto", "float32", "int8", "int4")
_FLOAT_TYPES = {"F32", "F16", "BF16", "float32", "float16", "bfloat16"}


def embedding_scheme(choice: str, method: str, shape: tuple[int, ...], stored: str) -> qz.Scheme | None:
    """How the embedding is stored: --embedding, or for "auto" the weights' width when the source's embedding
    was already quantized (re-expanding it to float only grows the file), else float32."""
    if choice not in EMBEDDINGS:
        raise CamelidError(f"--embedding {choice}: use one of {', '.join(EMBEDDINGS)}")
    if choice == "auto":
        choice = "float32" if stored in _FLOAT_TYPES else method
    return None if choice == "float32" else qz.scheme_for(choice, shape)


def _pieces(hf: str, scheme: qz.Scheme | None, shape: tuple[int, ...]) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of what one canonical tensor is stored as."""
    n, k = shape[0], shape[-1]
    if scheme is None:
        return [(hf, shape, torch.float32)]
    base = hf.removesuffix(".weight")
    if scheme.method == "int8" and not scheme.group:
        return [(hf, shape, torch.int8), (base + ".scales", (n,), torch.bfloat16)]
    if scheme.method == "int8":
        groups = k // scheme.group
        return [(hf, shape, torch.uint8), (base + ".scales", (n, groups), torch.bfloat16),
                (base + ".zeros", (n, groups), torch.bfloat16)]
    groups = k // scheme.group
    return [(hf, (n, k // 2), torch.uint8), (base + ".scales", (n, groups), torch.bfloat16),
            (base + ".zeros", (n, groups), torch.bfloat16)]


def _encode(tensor: torch.Tensor, scheme: qz.Scheme | None) -> list[torch.Tensor]:
    if scheme is None:
        return [tensor.float().contiguous()]
    if scheme.method == "int8":
        return list(qz.quantize_int8_grouped(tensor, scheme.group) if scheme.group else qz.quantize_int8(tensor))
    q, scales, zeros = qz.quantize_int4(tensor, scheme.group)
    return [qz.pack_nibbles(q), scales, zeros]


def quantize_checkpoint(src: str | Path, out: str | Path, method: str, *, group: int | None = None,
                        embedding: str = "auto", force: bool = False, progress: bool = True) -> ConvertResult:
    """Quantize every linear layer of SRC (any readable checkpoint) into a camelid folder at OUT; the
    embedding per `embedding` (see `embedding_scheme`)."""
    start = time.perf_counter()
    if method not in qz.METHODS:
        raise CamelidError(f"--quant {method}: use int8 or int4")
    reader = open_reader(src)
    try:
        cfg = source_config(reader)
        infos = canonical_infos(reader)
        check_tensors(reader.path, infos, cfg)
        order = list(infos)
        if HEAD not in infos:
            order.append(HEAD)  # the tied output matrix gets its own quantized copy
        schemes: dict[str, qz.Scheme | None] = {}
        plan: list[PlannedTensor] = []
        for hf in order:
            shape = tuple((infos[hf] if hf in infos else infos[EMBED])[1].shape)
            linear = len(shape) == 2 and hf != EMBED
            head = hf == HEAD and method == "int4"  # the output matrix keeps 8 bits (per channel) in int4 mode
            schemes[hf] = qz.scheme_for("int8" if head else method, shape, None if head else group) if linear else None
            if hf == EMBED:
                schemes[hf] = embedding_scheme(embedding, method, shape, infos[EMBED][1].dtype)
            plan += [PlannedTensor(n, s, d) for n, s, d in _pieces(hf, schemes[hf], shape)]
        with carried_by(reader) as carried:
            writer = writer_for("hf", out, cfg, plan=plan, force=force, tokenizer_files=carried.files,
                                chat_template=carried.chat_template)
            total = sum(math.prod(p.shape) * p.dtype.itemsize for p in plan)

            def tensors():
                for hf in order:
                    native = infos[hf][0] if hf in infos else infos[EMBED][0]
                    _, tensor = to_canonical(reader.format, native, reader.read(native, torch.float32),
                                             cfg.num_heads, cfg.num_kv_heads)
                    pieces = _pieces(hf, schemes[hf], tuple(tensor.shape))
                    for (name, _, dtype), t in zip(pieces, _encode(tensor, schemes[hf])):
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint to quantize (HF folder, .gguf, Meta folder ...)")
    p.add_argument("out", help="output folder")
    p.add_argument("--quant", choices=qz.METHODS, required=True, help="int8 (per output channel) or int4 (group-wise)")
    p.add_argument("--group", type=int, choices=qz.GROUPS,
                   help="int4 group size (default 32); with int8: per group instead of per output channel")
    p.add_argument("--embedding", choices=EMBEDDINGS, default="auto",
                   help="how to store the embedding: int8 / int4 (the weights' width, as GGUF files do) or float32; "
                        "auto (default): quantized like the weights when the source's embedding already was, else float32")
    p.add_argument("--quantize-embeddings", action="store_true", help="same as --embedding int8 (kept for scripts)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Write an int8 / int4 weight-only quantized copy of a model that camelid loads directly."""
    embedding = "int8" if args.quantize_embeddings and args.embedding == "auto" else args.embedding
    r = quantize_checkpoint(args.src, args.out, args.quant, group=args.group, embedding=embedding, force=args.force,
                            progress=not args.quiet)
    print(f"wrote {r.out} ({disk_size(r.out) / 2**20:.1f} MiB on disk, {r.tensors} tensors, {args.quant}) "
          f"in {r.seconds:.1f} s")
