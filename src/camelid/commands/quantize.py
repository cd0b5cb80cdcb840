"""`camelid quantize SRC OUT --quant int8|int4`: write a quantized model folder that camelid loads directly.

Only the command line lives here (no torch until the command runs): the pass is convert.quantize_checkpoint,
the stored layout camelid.quantize. The values are checked there, with one-line errors.
"""
from __future__ import annotations

import argparse

from .options import add_force, add_group, add_quiet


def cmd_quantize(args: argparse.Namespace) -> None:
    """Write an int8 / int4 weight-only quantized copy of a model that camelid loads directly."""
    from ..convert import disk_size, quantize_checkpoint
    embedding = "int8" if args.quantize_embeddings and args.embedding == "auto" else args.embedding
    r = quantize_checkpoint(args.src, args.out, args.quant, group=args.group, embedding=embedding, force=args.force,
                            progress=not args.quiet)
    print(f"wrote {r.out} ({disk_size(r.out) / 2**20:.1f} MiB on disk, {r.tensors} tensors, {args.quant}) "
          f"in {r.seconds:.1f} s")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help=cmd_quantize.__doc__, description=cmd_quantize.__doc__)
    p.add_argument("src", help="checkpoint to quantize (HF folder, .gguf, Meta folder ...)")
    p.add_argument("out", help="output folder")
    p.add_argument("--quant", choices=("int8", "int4"), required=True,
                   help="int8 (per output channel) or int4 (group-wise)")
    add_group(p)
    p.add_argument("--embedding", choices=("auto", "float32", "int8", "int4"), default="auto",
                   help="how to store the embedding: int8 / int4 (the weights' width, as GGUF files do) or float32; "
                        "auto (default): quantized like the weights when the source's embedding already was, else float32")
    p.add_argument("--quantize-embeddings", action="store_true", help="same as --embedding int8 (kept for scripts)")
    add_force(p)
    add_quiet(p)
    p.set_defaults(func=cmd_quantize)
